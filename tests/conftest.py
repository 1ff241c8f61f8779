import json

import numpy as np
import pytest
import torch
from helpers import save_nifti, synthetic_heart

from cmr_ood.networks import CMRUNet

TINY_NET = {"channels": [4, 8, 16], "num_res_units": 1}


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """Six synthetic subjects (ED and ES) with canonical labels and a manifest over them (folds 0-2)."""
    root = tmp_path_factory.mktemp("synthetic_data")
    entries = []
    for s in range(6):
        for p, phase in enumerate(("ED", "ES")):
            image, labels = synthetic_heart(shape=(48, 44, 4), radius=9 - 2 * p, seed=10 * s + p,
                                            centre=(22 + s, 20 + (s % 3)))
            name = f"subject{s}_{phase}"
            save_nifti(root / f"{name}.nii.gz", image, spacing=(1.6, 1.6, 8.0), acdc_header=True)
            save_nifti(root / f"{name}_gt.nii.gz", labels, spacing=(1.6, 1.6, 8.0), acdc_header=True, dtype=np.uint8)
            entries.append({"image": f"{name}.nii.gz", "label": f"{name}_gt.nii.gz", "subject": f"subject{s}",
                            "phase": phase, "dataset": "canonical", "group": "NOR", "fold": s % 3})
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"training": entries, "low_label": {"seed0": {"2": ["subject1", "subject2"]}}}))
    return root, manifest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.manual_seed(0)
    torch.save(CMRUNet(heads={"mim": 1, "position": 1}, **TINY_NET).state_dict(), path)  # the bundle's heads
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared CPU, tiny networks run several times faster than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

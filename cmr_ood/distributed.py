"""Batch inference sharded over processes (GPUs, nodes) with Lightning.

Each process segments its own share of the cases (every ``world_size``-th case from its rank: no case is
repeated or left out, unlike a padded ``DistributedSampler``), writes the same per-case outputs as
:func:`cmr_ood.inference.run_batch` and its records to ``cases.rank<k>.json``; after a barrier, rank 0
merges them into one ``cases.json`` in manifest order and removes the per-rank files.

Launch with Lightning's own launcher (``devices=N`` starts the other processes) or under ``torchrun``
(devices and nodes are then read from torchrun's environment), e.g. through the bundle:
``torchrun --nproc_per_node=N -m monai.bundle run --config_file "['configs/inference.json','configs/inference_multi_gpu.json']"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import TorchElasticEnvironment
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from cmr_ood.data.io import atomic_write
from cmr_ood.inference import CASES_FILE, OutputLock, Segmenter, _cases, _run_case, add_subject_results, check_states, write_results
from cmr_ood.ood.scorer import OODScorer
from cmr_ood.qc.classifier import QCClassifier
from cmr_ood.qc.groups import GroupClassifier

RANK_FILE = "cases.rank{rank}.json"


def is_global_zero() -> bool:
    """Whether this process is rank 0 of a distributed run, or the only process: the one that writes what the run
    writes once (the report). Lightning records the rank when it sets a run up; the record outlives the process
    group, which :func:`predict_distributed` closes."""
    return rank_zero_only.rank == 0


def shard(num_cases: int, rank: int, world_size: int) -> list[int]:
    """Indices of the cases that process ``rank`` of ``world_size`` handles: strided, so that a manifest sorted
    by size or site spreads evenly; together the shards hold every index exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} processes")
    return list(range(rank, num_cases, world_size))


class _IndexedCases(Dataset):
    """Some cases of a run, each yielded with its position in the whole run: ``(index, case dict)``."""

    def __init__(self, cases: list[dict], indices: list[int]):
        self.cases, self.indices = cases, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return self.indices[i], self.cases[self.indices[i]]


def _keep_case(item: tuple[int, dict]) -> tuple[int, dict]:
    """Collate that leaves a case dict as it is (paths, DICOM file lists): the step reads the files itself."""
    return item


class CaseShards(pl.LightningDataModule):
    """The cases of a batch run, each process loading only its own shard (one case per batch)."""

    def __init__(self, cases: list[dict]):
        super().__init__()
        self.cases = cases
        self.allow_zero_length_dataloader_with_multiple_devices = True  # more processes than cases: some get none

    def predict_dataloader(self) -> DataLoader:
        indices = shard(len(self.cases), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(_IndexedCases(self.cases, indices), batch_size=None, collate_fn=_keep_case)


class BatchSegmentation(pl.LightningModule):
    """Segments (and scores) one case per ``predict_step``; keeps each case's record, by manifest index."""

    def __init__(self, segmenter: Segmenter, output_dir: str | os.PathLike, overwrite: bool = False, scorer: OODScorer | None = None,
                 qc_classifier: QCClassifier | None = None):
        super().__init__()
        self.segmenter, self.scorer, self.qc_classifier = segmenter, scorer, qc_classifier
        self.network = segmenter.network  # a submodule, so that Lightning moves it to this process's device
        self.output_dir, self.overwrite = Path(output_dir), overwrite
        self.records: list[tuple[int, dict]] = []
        self.lock: OutputLock | None = None

    def setup(self, stage: str) -> None:
        if self.trainer.is_global_zero and self.lock is None:  # one run at a time in an output folder, as for run_batch
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.lock = OutputLock(self.output_dir)
            self.lock.acquire()

    def release_output_dir(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def on_predict_start(self) -> None:
        self.segmenter.device = self.device  # cuda:<local rank> in a multi-GPU run
        self.records = []

    def predict_step(self, batch: tuple[int, dict], batch_idx: int) -> dict:
        index, case = batch
        record = _run_case(self.segmenter, case, self.output_dir, self.overwrite, self.scorer, self.qc_classifier)  # errors: records
        self.records.append((index, record))
        return record


def trainer_options(segmenter: Segmenter, options: dict | None = None) -> dict:
    """Trainer arguments for a prediction run: the accelerator of the segmenter's device, no logger and no
    checkpoints, the explicit sharding (no distributed sampler); under torchrun, devices and nodes from its
    environment unless given. Options set to None take the default."""
    options = {k: v for k, v in (options or {}).items() if v is not None}  # None: the default
    if options.get("use_distributed_sampler"):
        raise ValueError("use_distributed_sampler must stay False: each process takes its own shard of the cases "
                         "(a distributed sampler would repeat cases to even out the shards)")
    defaults = {"accelerator": "gpu" if segmenter.device.type == "cuda" else segmenter.device.type, "devices": "auto",
                "num_nodes": 1, "logger": False, "enable_checkpointing": False, "enable_model_summary": False}
    if TorchElasticEnvironment.detect():  # torchrun started the processes: match its world
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        defaults.update(devices=per_node, num_nodes=int(os.environ["WORLD_SIZE"]) // per_node)
        if options.get("devices") == "auto":
            del options["devices"]
    return {**defaults, **options, "use_distributed_sampler": False}


def write_rank_records(output_dir: Path, rank: int, world_size: int, num_cases: int, records: list[tuple[int, dict]]) -> str:
    """One process's records, with their manifest indices, written atomically to ``cases.rank<k>.json``."""
    content = {"rank": rank, "world_size": world_size, "num_cases": num_cases,
               "indices": [i for i, _ in records], "records": [r for _, r in records]}
    return atomic_write(Path(output_dir) / RANK_FILE.format(rank=rank), lambda tmp: Path(tmp).write_text(json.dumps(content) + "\n"),
                        overwrite=True)


def merge_rank_records(output_dir: Path, world_size: int, num_cases: int, group_classifier: GroupClassifier | None = None) -> list[dict]:
    """Every process's records in manifest order, checked to hold each case exactly once, written to
    ``cases.json``; the per-rank files are removed afterwards."""
    output_dir = Path(output_dir)
    merged: list[dict | None] = [None] * num_cases
    paths = [output_dir / RANK_FILE.format(rank=k) for k in range(world_size)]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing, a process of the run wrote no records")
        content = json.loads(path.read_text())
        if (content["world_size"], content["num_cases"]) != (world_size, num_cases):
            raise ValueError(f"{path}: written by a run of {content['world_size']} processes over {content['num_cases']} cases, "
                             f"not this one ({world_size} processes, {num_cases} cases)")
        for index, record in zip(content["indices"], content["records"]):
            if merged[index] is not None:
                raise ValueError(f"{path}: case {index} ({record['image']}) has a record from another process already")
            merged[index] = record
    missing = [i for i, r in enumerate(merged) if r is None]
    if missing:
        raise ValueError(f"{output_dir}: no record for the cases at positions {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    add_subject_results(merged, group_classifier)
    write_results(output_dir, merged)
    for path in paths:
        path.unlink()
    return merged


def predict_distributed(segmenter: Segmenter, output_dir: str | os.PathLike, dataset_dir: str | None = None,
                        manifest: str | None = None, data_root: str | None = None, overwrite: bool = False,
                        scorer: OODScorer | None = None, trainer: dict | None = None, qc_classifier: QCClassifier | None = None,
                        group_classifier: GroupClassifier | None = None) -> list[dict]:
    """:func:`cmr_ood.inference.run_batch` sharded over the processes of a Lightning run; ``trainer`` holds
    Trainer options (``devices``, ``num_nodes``, ``accelerator``, ``precision``, ...). Every process returns
    the merged records (one per case, in manifest order), as written to ``<output_dir>/cases.json``."""
    if (dataset_dir is None) == (manifest is None):
        raise ValueError("give exactly one of dataset_dir and manifest")
    output_dir = Path(output_dir).resolve()
    cases_file = output_dir / CASES_FILE
    if cases_file.exists() and not overwrite:  # checked by every process before any of them writes
        raise FileExistsError(f"{cases_file} exists already: choose another output_dir, or set overwrite to replace its results")
    qc_classifier = check_states(segmenter, scorer, qc_classifier)
    cases = _cases(dataset_dir, manifest, data_root)
    runner = pl.Trainer(**trainer_options(segmenter, trainer))
    module = BatchSegmentation(segmenter, output_dir, overwrite, scorer, qc_classifier)
    try:
        runner.predict(module, datamodule=CaseShards(cases), return_predictions=False)
        rank, world_size = runner.global_rank, runner.world_size
        write_rank_records(output_dir, rank, world_size, len(cases), module.records)
        print(f"process {rank} of {world_size}: {len(module.records)} cases")
        runner.strategy.barrier("cases-written")
        records = merge_rank_records(output_dir, world_size, len(cases), group_classifier) if rank == 0 else None
    finally:
        module.release_output_dir()
    records = runner.strategy.broadcast(records)
    if torch.distributed.is_initialized():
        # the last collective of the run: a group left open until the interpreter exits can abort a process
        # (std::terminate in its communication threads) while rank 0 is still writing the report
        torch.distributed.destroy_process_group()
    if rank == 0:
        failed = sum(r["status"] != "ok" for r in records)
        flagged = f", {sum(bool(r.get('ood_flag')) for r in records)} flagged as out of distribution" if scorer else ""
        print(f"{len(records) - failed} of {len(records)} cases segmented on {world_size} processes{flagged}; results in {cases_file}")
    return records

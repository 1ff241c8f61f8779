from functools import partial

import pytest
import torch
from conftest import TINY_NET
from helpers import BUNDLE

from cmr_ood.data.augment import BatchAugment
from cmr_ood.networks import CMRUNet, load_weights
from cmr_ood.ssl import DINO, PositionalContrastiveLearning, SimCLR, nt_xent
from cmr_ood.ssl.contrastive import pooled_features, position_positives, view_positives
from cmr_ood.train import main
from cmr_ood.training.module import SegmentationModule


def test_nt_xent_with_the_other_view_as_positive_is_monai_contrastive_loss():
    from monai.losses import ContrastiveLoss

    torch.manual_seed(0)
    first, second = torch.randn(6, 16), torch.randn(6, 16)
    ours = nt_xent(torch.cat([first, second]), view_positives(2, 6), temperature=0.5)
    assert ours.item() == pytest.approx(ContrastiveLoss(temperature=0.5)(first, second).item(), rel=1e-5)


def test_nt_xent_is_lower_when_positives_agree():
    torch.manual_seed(0)
    z = torch.randn(8, 32)
    positives = view_positives(2, 8)
    matched = nt_xent(torch.cat([z, z + 0.01 * torch.randn_like(z)]), positives, 0.1)
    shuffled = nt_xent(torch.cat([z, z[torch.roll(torch.arange(8), 1)]]), positives, 0.1)
    assert matched < 0.1 < 1.0 < shuffled


def test_view_and_position_positive_masks():
    views = view_positives(2, 3)
    expected = torch.tensor([[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1],
                             [1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(views, expected)
    # PCL, two views of slices at 0, 1/16, 1/4 and 15/16: positives differ by less than 0.1 (never oneself)
    pcl = PositionalContrastiveLearning(features=4).positives(2, torch.tensor([0.0, 0.0625, 0.25, 0.9375]))
    close = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(pcl, close.repeat(2, 2).fill_diagonal_(False))
    assert torch.equal(position_positives(torch.tensor([0.5, 0.625]), 0.1), torch.zeros(2, 2, dtype=torch.bool))


def test_pcl_loss_rewards_embeddings_that_follow_slice_position():
    torch.manual_seed(0)
    positions = torch.tensor([0.0, 0.05, 0.5, 0.55, 1.0, 0.95])
    by_position = torch.randn(3, 16)[torch.tensor([0, 0, 1, 1, 2, 2])]  # one embedding per position group
    by_slice = torch.randn(6, 16)  # each slice its own embedding: right for SimCLR, not for PCL
    task = PositionalContrastiveLearning(features=16)

    def loss(z):
        return nt_xent(z.repeat(2, 1), task.positives(2, positions), task.temperature)

    assert loss(by_position) < loss(by_slice)
    pairs = SimCLR(features=16).positives(2, positions)
    # SimCLR's positives (the same slice only) rank them the other way round
    assert nt_xent(by_slice.repeat(2, 1), pairs, 0.1) < nt_xent(by_position.repeat(2, 1), pairs, 0.1)


def _dino(**options):
    torch.manual_seed(0)
    net = CMRUNet(**TINY_NET)
    return net, DINO(net.encoder, features=TINY_NET["channels"][-1], hidden=32, bottleneck=16, prototypes=64, **options)


def test_dino_teacher_is_an_ema_of_the_student_and_gets_no_gradients():
    net, dino = _dino(local_crops=2)
    embed = partial(pooled_features, net.encoder)
    loss = dino.loss(embed, torch.rand(2, 4, 1, 32, 32))
    loss.backward()
    assert torch.isfinite(loss)
    teacher = [*dino.teacher_encoder.parameters(), *dino.teacher_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert all(p.grad is not None for p in net.encoder.parameters()) and all(p.grad is not None for p in dino.head.parameters())
    assert not any(p.requires_grad for p in dino.teacher_encoder.parameters())

    before = [p.clone() for p in dino.teacher_encoder.parameters()]
    with torch.no_grad():  # a student step
        for p in net.encoder.parameters():
            p.add_(torch.randn_like(p))
    dino.update_teacher(net.encoder, progress=0.0)
    for old, new, student in zip(before, dino.teacher_encoder.parameters(), net.encoder.parameters()):
        assert torch.allclose(new, 0.996 * old + 0.004 * student, atol=1e-6)
    assert not torch.equal(before[0], next(dino.teacher_encoder.parameters()))
    settled = [p.clone() for p in dino.teacher_encoder.parameters()]
    dino.update_teacher(net.encoder, progress=1.0)  # momentum 1 at the end of training: the teacher stays
    assert all(torch.equal(a, b) for a, b in zip(settled, dino.teacher_encoder.parameters()))
    assert dino.momentum(0.5) == pytest.approx(0.998)
    assert not dino.train().teacher_encoder.training and dino.head.training


def test_dino_centre_and_local_crops():
    net, dino = _dino(local_crops=3, local_scale=(0.25, 0.25))
    views = torch.rand(2, 4, 1, 32, 32)
    crops = dino.crops(views)
    assert crops.shape == (3 * 4, 1, 16, 16)
    # a crop of half the side of a constant view is that constant
    assert torch.allclose(dino.crops(torch.full((2, 4, 1, 32, 32), 0.7)), torch.full((12, 1, 16, 16), 0.7), atol=1e-5)
    assert torch.all(dino.centre == 0)
    dino.loss(partial(pooled_features, net.encoder), views)
    assert dino.centre.abs().sum() > 0  # moved towards the teacher's mean output
    frozen = dino.centre.clone()
    dino.eval().loss(partial(pooled_features, net.encoder), views)
    assert torch.equal(dino.centre, frozen)  # only training updates it


def test_augment_views_are_independent_and_one_view_is_the_plain_call():
    augment = BatchAugment(patch_size=24)
    images, labels = torch.rand(3, 1, 32, 32), torch.randint(0, 4, (3, 32, 32))
    torch.manual_seed(1)
    views, view_labels = augment.views(images, labels, 2)
    assert views.shape == (2, 3, 1, 24, 24) and view_labels.shape == (2, 3, 24, 24)
    assert not torch.allclose(views[0], views[1])
    torch.manual_seed(1)
    single, single_labels = augment.views(images, labels, 1)
    torch.manual_seed(1)
    plain, plain_labels = augment(images, labels)
    assert torch.equal(single[0], plain) and torch.equal(single_labels[0], plain_labels)


def test_module_combines_segmentation_with_a_contrastive_task_and_asks_for_views():
    torch.manual_seed(0)
    module = SegmentationModule(CMRUNet(**TINY_NET), tasks={"seg": 1.0, "pcl": 1.0})
    assert module.views_per_slice == 2 and SegmentationModule(CMRUNet(**TINY_NET)).views_per_slice == 1
    views = torch.rand(2, 4, 1, 32, 32)
    batch = {"image": views[0], "label": torch.randint(0, 4, (4, 32, 32)), "position": torch.rand(4), "views": views}
    losses = module.task_losses(batch, module.tasks)
    assert set(losses) == {"seg", "pcl"} and all(torch.isfinite(v) for v in losses.values())
    projector = set(map(id, module.contrastive["pcl"].parameters()))
    assert projector and projector <= set(map(id, module.parameters()))  # optimised with the network ...
    assert not any(k.startswith("contrastive") for k in module.network.state_dict())  # ... not exported with it
    with pytest.raises(ValueError, match="augmented views"):
        module.task_losses({k: v for k, v in batch.items() if k != "views"}, module.tasks)
    with pytest.raises(ValueError, match="task_options"):
        SegmentationModule(CMRUNet(**TINY_NET), tasks={"simclr": 1.0}, task_options={"dino": {"local_crops": 2}})


@pytest.mark.parametrize("method", ["simclr", "pcl", "dino"])
def test_pretraining_config_trains_through_the_cli_and_exports_the_network(method, synthetic_dataset, tmp_path):
    root, manifest = synthetic_dataset
    cli = main([
        "fit", f"--config={BUNDLE / 'configs' / f'pretrain_{method}.yaml'}", f"--data.manifest={manifest}",
        f"--data.data_root={root}", "--data.train_folds=[1, 2]", "--data.canvas=64", "--data.batch_size=8",
        "--data.steps_per_epoch=2", f"--data.cache_dir={tmp_path / 'cache'}", "--data.augment.patch_size=48",
        f"--model.network.channels={TINY_NET['channels']}", "--model.network.num_res_units=1", "--model.warmup_steps=1",
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.precision=32", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.path={tmp_path / 'model.pt'}",
    ])
    assert cli.trainer.global_step == 2 and torch.isfinite(cli.trainer.callback_metrics[f"train/loss_{method}"])
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in cli.model.contrastive[method].parameters() if p.requires_grad} <= optimised
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(exported) == set(CMRUNet(**TINY_NET).state_dict())  # the plain network, no projection head or teacher
    net = load_weights(CMRUNet(heads={"mim": 1, "position": 1}, **TINY_NET), tmp_path / "model.pt", strict=False)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in cli.model.network.state_dict().items())
    if method == "dino":
        assert cli.model.contrastive["dino"].local_crops == 4  # the recipe's task_options reached the task
        teacher, student = cli.model.contrastive["dino"].teacher_encoder, cli.model.network.encoder
        assert not all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))  # lags behind

"""prune_means: what pruned channels sent on average goes back into the layers that read them."""
import copy
import warnings

import pytest
import torch
from torch import nn

from mmopt.passes.prune_means import RemovedMeans, input_means


def _net() -> nn.Sequential:
    """conv -> bn -> relu -> 1x1 conv -> bn -> relu -> pool -> linear, with BatchNorms whose shifts make the
    channels' means far from zero (as trained ones do)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.bias.uniform_(0.5, 2.0)
            bn.running_mean.uniform_(-0.2, 0.2)
    return net.eval()


def _pruned(net: nn.Sequential, roots: list[int], x: torch.Tensor, fold: bool) -> tuple:
    """Half the output channels of the convolutions at ``roots`` removed by Torch-Pruning, means folded or not."""
    import torch_pruning as tp

    net = copy.deepcopy(net)
    convs = [i for i, m in enumerate(net) if isinstance(m, nn.Conv2d)]
    ignored = [net[i] for i in convs if i not in roots] + [net[8]]
    modules = {name: m for name, m in net.named_modules() if name}
    removed = RemovedMeans(net, input_means(modules, lambda b: net(b[0]), [(x,)]), "test inputs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(net, x[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=ignored)
        for group in pruner.step(interactive=True):
            removed.observe(group)
            group.prune()
    return net, (removed.fold() if fold else {}), removed


def _until(net: nn.Sequential, index: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net[:index + 1](x)


def test_a_batchnorm_reading_pruned_channels_keeps_its_calibration_mean():
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    net = _net()
    folded, info, _ = _pruned(net, [0], x, fold=True)
    cut, _, _ = _pruned(net, [0], x, fold=False)
    assert folded[3].in_channels == 4 and folded[3].out_channels == 6
    want = _until(net, 4, x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(_until(folded, 4, x).mean(dim=(0, 2, 3)), want, atol=1e-4, rtol=1e-4)
    assert (_until(cut, 4, x).mean(dim=(0, 2, 3)) - want).abs().max() > 0.1     # the constant pruning took away
    assert info == {"layers": 1, "unfolded": [], "inputs": "test inputs"}


def test_a_linear_reading_pruned_channels_gets_their_mean_in_its_bias_and_rows_follow_the_pruning():
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    net = _net()
    folded, info, removed = _pruned(net, [0, 3], x, fold=True)    # conv 3 loses inputs and outputs: rows move
    assert folded[3].in_channels == 4 and folded[3].out_channels == 3 and folded[8].in_features == 3
    assert info["layers"] == 2
    rows = removed.rows["3"]
    torch.testing.assert_close(_until(folded, 4, x).mean(dim=(0, 2, 3)), _until(net, 4, x).mean(dim=(0, 2, 3))[rows],
                               atol=1e-4, rtol=1e-4)
    gone = [i for i in range(6) if i not in removed.cols["8"].tolist()]
    pooled = _until(net, 7, x)
    with torch.no_grad():
        torch.testing.assert_close(folded[8].bias - net[8].bias, net[8].weight[:, gone] @ pooled[:, gone].mean(0),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("calibrated", [True, False])
def test_channel_pruning_folds_means_on_calibration_images_only(tmp_path, calibrated):
    from mmopt.adapters.torchvision import TorchvisionAdapter
    from mmopt.calibration import Calibration
    from mmopt.passes import prune
    from mmopt.passes.base import Context
    from tests.conftest import noise_images

    calib = None
    if calibrated:
        calib = Calibration(images_dir=noise_images(tmp_path / "photos", 6), batch_size=4, num_workers=0)
    adapter = TorchvisionAdapter()
    torch.manual_seed(0)
    model = adapter.build({"name": "resnet18", "kwargs": {}}, {"image_size": 32}, {})
    pass_ = prune.Prune(prune.PruneConfig(target="channels", amount=0.3))
    result = pass_.apply(model, Context(adapter=adapter, calibration=calib))
    folded = result.metrics["visual"]["pruned"]["means_folded"]
    if calibrated:
        assert folded["layers"] > 10 and folded["unfolded"] == [] and folded["inputs"] == "calibration images (6)"
        assert "means folded into" in pass_.brief(result.metrics["visual"])
    else:
        assert folded["layers"] == 0 and folded["note"].startswith("not folded: means need calibration images")

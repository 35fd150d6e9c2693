"""Tests of the model zoo: shapes, gradients, normalization, inference dropout, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from robustcnn.errors import ConfigError, ModelError, RobustCNNError
from robustcnn.models import (
    Classifier,
    InferenceDropout,
    available_models,
    build_model,
    count_parameters,
    model_label,
    register_model,
    set_inference_dropout,
)
from robustcnn.models import registry as registry_module

ZOO = ["lenet5", "madry_cnn", "vgg11_small", "resnet18", "mobilenet_v2"]
# Thin variants keep the big nets fast on a CPU; the architecture is otherwise the same.
SMALL = {"vgg11_small": {"width": 0.125}, "resnet18": {"width": 0.125}, "mobilenet_v2": {"width": 0.25}}
SHAPES = [(1, 28, 28), (3, 32, 32)]


def make(name: str, shape: tuple[int, int, int] = (1, 28, 28), **kw: object) -> Classifier:
    options = {**SMALL.get(name, {}), **kw}
    c = shape[0]
    return build_model(name, input_shape=shape, num_classes=10, mean=[0.5] * c, std=[0.25] * c, **options)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_zoo_is_registered() -> None:
    assert set(ZOO) <= set(available_models())
    assert available_models() == sorted(available_models())


@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", ZOO)
def test_forward_shape_and_input_gradient(name: str, shape: tuple[int, int, int]) -> None:
    model = make(name, shape).eval()
    assert (model.name, model.input_shape, model.num_classes, model.bounds) == (name, shape, 10, (0.0, 1.0))
    x = torch.rand(3, *shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits[:, 0].sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_holds_only_net_weights(name: str) -> None:
    keys = list(make(name).state_dict())
    assert keys and all(k.startswith("net.") for k in keys)
    assert "mean" not in keys and "std" not in keys


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_keys_do_not_depend_on_dropout(name: str) -> None:
    without = make(name, dropout=0.0).state_dict()
    with_dropout = make(name, dropout=0.5).state_dict()
    assert list(without) == list(with_dropout)
    assert all(without[k].shape == with_dropout[k].shape for k in without)


@pytest.mark.parametrize("name", ZOO)
def test_inference_dropout_toggle(name: str) -> None:
    model = make(name, dropout=0.5).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert not model.stochastic
        assert torch.equal(model(x), model(x))

        assert set_inference_dropout(model, True) == 1
        assert model.stochastic
        assert not model.training
        assert not torch.equal(model(x), model(x))

        assert set_inference_dropout(model, False) == 1
        assert not model.stochastic
        assert torch.equal(model(x), model(x))


def test_zero_rate_dropout_is_never_stochastic() -> None:
    model = make("lenet5", dropout=0.0).eval()
    assert set_inference_dropout(model, True) == 1
    assert not model.stochastic
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model(x), model(x))


def test_inference_dropout_behaves_like_dropout_unless_always_on() -> None:
    layer = InferenceDropout(0.5)
    x = torch.ones(1000)
    assert not layer.always_on
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.always_on = True
    y = layer(x)
    assert ((y == 0) | (y == 2)).all() and (y == 0).any()
    layer.train()
    layer.always_on = False
    assert (layer(x) == 0).any()


class _InputStats(nn.Module):
    """Returns the per-channel mean of what it receives: shows what the Classifier feeds the net."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def test_classifier_normalizes_inputs() -> None:
    mean, std = [0.5, 0.25, 0.1], [0.5, 0.25, 0.2]
    model = Classifier(_InputStats(), mean=mean, std=std, input_shape=(3, 4, 4), num_classes=3)
    raw = torch.tensor([0.0, 0.75, 0.3]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    expected = torch.tensor([(0.0 - 0.5) / 0.5, (0.75 - 0.25) / 0.25, (0.3 - 0.1) / 0.2])
    torch.testing.assert_close(model(raw), expected.expand(2, 3))
    assert list(model.state_dict()) == []
    assert model.mean.shape == model.std.shape == (1, 3, 1, 1)
    assert model.name == "custom" and model.bounds == (0.0, 1.0)


def test_classifier_rejects_bad_statistics_and_shapes() -> None:
    with pytest.raises(ConfigError, match="one mean value per channel"):
        Classifier(_InputStats(), mean=[0.5], std=[0.5, 0.5, 0.5], input_shape=(3, 4, 4), num_classes=3)
    with pytest.raises(ConfigError, match="std values must be finite and > 0"):
        Classifier(_InputStats(), mean=[0.5] * 3, std=[0.5, 0.0, 0.5], input_shape=(3, 4, 4), num_classes=3)
    model = Classifier(_InputStats(), mean=[0.5] * 3, std=[0.5] * 3, input_shape=(3, 4, 4), num_classes=3)
    with pytest.raises(ModelError, match=r"expects images shaped \[N, 3, 4, 4\]"):
        model(torch.rand(3, 4, 4))
    wrong_classes = Classifier(
        _InputStats(), mean=[0.5] * 3, std=[0.5] * 3, input_shape=(3, 4, 4), num_classes=5
    )
    with pytest.raises(ModelError, match="num_classes logits"):
        wrong_classes(torch.rand(1, 3, 4, 4))


def test_lenet5_parameter_count() -> None:
    # conv1 1*32*9+32, conv2 32*64*9+64, fc1 (64*7*7)*200+200, fc2 200*10+10
    expected = (1 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 7 * 7 * 200 + 200) + (200 * 10 + 10)
    assert expected == 320 + 18496 + 627400 + 2010 == 648226
    assert count_parameters(make("lenet5")) == expected


def test_madry_cnn_parameter_count() -> None:
    expected = (1 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (64 * 7 * 7 * 1024 + 1024) + (1024 * 10 + 10)
    assert count_parameters(make("madry_cnn")) == expected == 3274634


def test_full_width_parameter_counts() -> None:
    """Reference numbers of the standard CIFAR-10 networks (3x32x32, 10 classes, width 1)."""
    counts = {n: count_parameters(make(n, (3, 32, 32), width=1.0)) for n in SMALL}
    assert counts["resnet18"] == 11_173_962  # the usual CIFAR ResNet-18
    assert counts["mobilenet_v2"] == 2_236_682  # torchvision's MobileNetV2 with a 10-class head
    convs = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    vgg = sum(i * o * 9 + 2 * o for i, o in convs) + 512 * 10 + 10  # bias-free convs + BN + linear
    assert counts["vgg11_small"] == vgg


def test_count_parameters_trainable_only() -> None:
    model = make("lenet5")
    model.net.fc1.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 648226 - 627400
    assert count_parameters(model) == 648226


def test_width_scales_channels() -> None:
    assert count_parameters(make("resnet18", width=0.25)) < count_parameters(make("resnet18", width=0.5))


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="unknown model 'lenet6'") as info:
        make("lenet6")
    for name in ZOO:
        assert name in str(info.value)


def test_unknown_option_names_key_and_accepted_keys() -> None:
    with pytest.raises(ConfigError, match="'depth'") as info:
        make("resnet18", depth=34)
    assert "width" in str(info.value)
    with pytest.raises(ConfigError, match="'width'.*accepted options: pooling"):
        make("lenet5", width=0.5)
    with pytest.raises(ConfigError, match="'pooling'.*accepted options: width"):
        make("resnet18", pooling="avg")  # no 2x2 pool to change: the option does not apply


POOLED = ["lenet5", "madry_cnn", "vgg11_small"]


@pytest.mark.parametrize("name", POOLED)
def test_avg_pooling_replaces_every_max_pool(name: str) -> None:
    """The same weights, every 2x2 max-pool an average pool: another function of the input."""
    max_pooled, avg_pooled = make(name), make(name, pooling="avg")
    kinds = [{type(m) for m in model.modules()} for model in (max_pooled, avg_pooled)]
    assert nn.MaxPool2d in kinds[0] and nn.AvgPool2d not in kinds[0]
    assert nn.AvgPool2d in kinds[1] and nn.MaxPool2d not in kinds[1]
    avg_pooled.load_state_dict(max_pooled.state_dict())  # no weights of its own: same shapes
    x = torch.rand(2, 1, 28, 28)
    max_pooled.eval(), avg_pooled.eval()
    assert not torch.allclose(max_pooled(x), avg_pooled(x))


def test_avg_pooling_averages_each_window() -> None:
    net = make("lenet5", pooling="avg").net
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert net.pool(x).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


@pytest.mark.parametrize("pooling", ["min", "", 2, None])
def test_bad_pooling(pooling: object) -> None:
    with pytest.raises(ConfigError, match=r"pooling=.* is not a pooling; use max or avg"):
        make("lenet5", pooling=pooling)


def test_model_label_names_only_changed_options() -> None:
    assert model_label("lenet5", {"name": "lenet5", "dropout": 0.0, "pooling": "max"}) == "lenet5"
    assert model_label("lenet5", {"dropout": 0.0, "pooling": "avg"}) == "lenet5 pooling=avg"
    assert model_label("vgg11_small", {"width": 0.25, "pooling": "max"}) == "vgg11_small width=0.25"
    assert model_label("not_registered", {"pooling": "avg"}) == "not_registered"


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_bad_dropout_rate(rate: object) -> None:
    with pytest.raises(ConfigError, match=r"model.dropout=.* must be a rate in \[0, 1\)"):
        make("lenet5", dropout=rate)


@pytest.mark.parametrize("width", [0, -1.0, float("inf"), "wide"])
def test_bad_width(width: object) -> None:
    with pytest.raises(ConfigError, match="width must be a number > 0"):
        make("vgg11_small", width=width)


@pytest.mark.parametrize(
    ("name", "minimum"),
    [("lenet5", 4), ("madry_cnn", 4), ("vgg11_small", 17), ("resnet18", 5), ("mobilenet_v2", 5)],
)
def test_too_small_input_states_minimum(name: str, minimum: int) -> None:
    with pytest.raises(ModelError, match=f"at least {minimum}x{minimum} pixels"):
        make(name, (1, minimum - 1, 28))
    model = make(name, (1, minimum, minimum)).eval()  # the minimum itself works
    assert model(torch.rand(1, 1, minimum, minimum)).shape == (1, 10)


def test_bad_shape_and_classes() -> None:
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("lenet5", input_shape=(28, 28), num_classes=10, mean=[0.5], std=[0.5])
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("lenet5", input_shape=(1, 28, 28), num_classes=1, mean=[0.5], std=[0.5])
    with pytest.raises(ConfigError, match="one mean value per channel"):
        build_model("lenet5", input_shape=(3, 32, 32), num_classes=10, mean=[0.5], std=[0.5] * 3)


def test_errors_share_the_base_class() -> None:
    with pytest.raises(RobustCNNError):
        make("nope")


def test_register_custom_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_model("tiny_test_net")
    def tiny(
        *,
        in_channels: int,
        num_classes: int,
        input_size: tuple[int, int],
        dropout: float = 0.0,
        hidden: int = 4,
    ) -> nn.Module:
        h, w = input_size
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * h * w, hidden),
            InferenceDropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    assert "tiny_test_net" in available_models()
    model = build_model(
        "tiny_test_net", input_shape=(1, 5, 5), num_classes=3, mean=[0.0], std=[1.0], hidden=7
    )
    assert model(torch.rand(2, 1, 5, 5)).shape == (2, 3)
    assert count_parameters(model) == 25 * 7 + 7 + 7 * 3 + 3
    with pytest.raises(ModelError, match="already registered"):
        register_model("tiny_test_net")(tiny)
    with pytest.raises(ModelError, match="does not accept"):
        register_model("broken_test_net")(lambda *, in_channels: nn.Identity())

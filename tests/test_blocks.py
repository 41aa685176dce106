"""Tests for surgical_optim.blocks: which parameters form which block, and selecting blocks."""

from __future__ import annotations

import collections
import pickle

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import surgical_optim
from surgical_optim.blocks import (
    BlockRow,
    TrainableReport,
    UnknownBlockError,
    block_names,
    param_groups_by_block,
    select_blocks,
    trainable_report,
)

torchvision = pytest.importorskip("torchvision")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def named_blocks(model, matcher=None):
    """[(block name, set of parameter names)] as param_groups_by_block groups all parameters."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_by_block(model, matcher, trainable_only=False)
    return [(g["name"], {name_of[id(p)] for p in g["params"]}) for g in groups]


def on_meta(build, *args, **kwargs):
    """Build a model without initialising its weights (fast): blocks depend on structure only."""
    with torch.device("meta"):
        return build(*args, **kwargs)


def assert_exact_partition(model, matcher=None):
    """Every parameter (shared ones once) is in exactly one block; block names are unique."""
    groups = param_groups_by_block(model, matcher, trainable_only=False)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    assert names == block_names(model, matcher)


def block_of(model, param_name):
    return next(b for b, members in named_blocks(model) if param_name in members)


class _Layer(nn.Module):
    """A composite module (its weights sit in a submodule), so a container of them is split."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.linear(x)


class Tiny(nn.Module):
    """stem | body.0 | body.2 | head, by the fallback rule."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(2, 3)
        self.act = nn.ReLU()  # no parameters: no block
        self.body = nn.Sequential(_Layer(3, 3), nn.ReLU(), _Layer(3, 4))
        self.head = nn.Linear(4, 1)


TINY_BLOCKS = ["stem", "body.0", "body.2", "head"]


# --------------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18(weights=None)


def test_resnet18_blocks(resnet18):
    blocks = dict(named_blocks(resnet18))
    assert list(blocks) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert blocks["stem"] == {"conv1.weight", "bn1.weight", "bn1.bias"}
    assert blocks["fc"] == {"fc.weight", "fc.bias"}
    for k in range(1, 5):
        assert blocks[f"layer{k}"] == {
            n for n, _ in resnet18.named_parameters() if n.startswith(f"layer{k}.")
        }
    assert_exact_partition(resnet18)


def test_wide_resnet50_2_blocks():
    model = on_meta(torchvision.models.wide_resnet50_2, weights=None)
    assert block_names(model) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert dict(named_blocks(model))["stem"] == {"conv1.weight", "bn1.weight", "bn1.bias"}
    assert_exact_partition(model)


class _WRNBasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if c_in != c_out else None


class _NetworkBlock(nn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                _WRNBasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                for i in range(n)
            ]
        )


class TinyRobustBenchWRN(nn.Module):
    """The layout of RobustBench's WideResNet (and TRADES', with its unused sub_block1)."""

    def __init__(self, sub_block=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(1, 4, 8, 1)
        if sub_block:
            self.sub_block1 = _NetworkBlock(1, 4, 8, 1)
        self.block2 = _NetworkBlock(1, 8, 16, 2)
        self.block3 = _NetworkBlock(1, 16, 32, 2)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(32, 10)


@pytest.mark.parametrize("sub_block", [False, True])
def test_robustbench_wrn_paper_blocks(sub_block):
    model = TinyRobustBenchWRN(sub_block)
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["block1", "block2", "block3", "fc"]
    assert "conv1.weight" in blocks["block1"]
    assert {"bn1.weight", "bn1.bias"} <= blocks["block3"]
    if sub_block:  # TRADES' unused twin of block1 sits with block1
        twin = {n for n, _ in model.named_parameters() if n.startswith("sub_block1.")}
        assert twin and twin < blocks["block1"]
    assert blocks["fc"] == {"fc.weight", "fc.bias"}
    assert_exact_partition(model)


def test_torchvision_vit_blocks():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["embed", "layer0", "layer1", "layer2", "heads"]
    assert blocks["embed"] == {
        "class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"
    }
    assert {"encoder.ln.weight", "encoder.ln.bias"} <= blocks["layer2"]
    assert all(n.startswith("encoder.layers.encoder_layer_0.") for n in blocks["layer0"])
    assert blocks["heads"] == {"heads.head.weight", "heads.head.bias"}
    assert_exact_partition(model)


def _features(n, *tail):
    return [f"features.{i}" for i in range(n)] + list(tail)


@pytest.mark.parametrize(
    ("builder", "expected", "meta"),
    [
        ("convnext_tiny", _features(8, "classifier"), True),
        ("efficientnet_b0", _features(9, "classifier"), True),
        ("mobilenet_v3_small", _features(13, "classifier"), True),
        ("swin_t", _features(8, "norm", "head"), True),
        # RegNet computes its widths with tensors, which the meta device cannot read back.
        ("regnet_x_400mf", ["stem", *(f"trunk_output.block{i}" for i in range(1, 5)), "fc"], False),
    ],
)
def test_torchvision_trunk_cnns(builder, expected, meta):
    build = getattr(torchvision.models, builder)
    model = on_meta(build, weights=None) if meta else build(weights=None)
    assert block_names(model) == expected
    # The classifier head is one block even where it is an nn.Sequential (ConvNeXt: norm + linear).
    head = [n for n, _ in model.named_parameters() if n.split(".")[0] == expected[-1]]
    assert dict(named_blocks(model))[expected[-1]] == set(head)
    assert_exact_partition(model)


# --------------------------------------------------------------------------------------------------
# timm: the grouping must equal timm's own coarse grouping
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {}),
        ("vit_tiny_patch16_224", {"img_size": 32}),
        ("convnext_atto", {}),
        ("efficientnet_b0", {}),
        ("swin_tiny_patch4_window7_224", {}),
        # Its group_matcher returns a callable (name -> ordinal), not a dict of regexes.
        ("cait_xxs24_224", {"img_size": 32}),
    ],
)
def test_timm_grouping_equals_timm(name, kwargs):
    timm = pytest.importorskip("timm")
    from timm.models import group_parameters

    model = on_meta(timm.create_model, name, pretrained=False, **kwargs)
    expected = group_parameters(model, model.group_matcher(coarse=True))
    expected_sets = [set(expected[k]) for k in sorted(expected)]
    assert [members for _, members in named_blocks(model)] == expected_sets
    assert_exact_partition(model)


def test_timm_group_names():
    timm = pytest.importorskip("timm")
    resnet = on_meta(timm.create_model, "resnet18", pretrained=False)
    assert block_names(resnet) == ["stem", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "fc"]
    vit = on_meta(timm.create_model, "vit_tiny_patch16_224", img_size=32, depth=3)
    blocks = dict(named_blocks(vit))
    assert list(blocks) == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    # (r"^norm", (99999,)) joins the final norm to the last block.
    assert {"norm.weight", "norm.bias"} <= blocks["blocks.2"]


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers
# --------------------------------------------------------------------------------------------------


def _bert_config(transformers):
    return transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        vocab_size=100,
    )


def test_hf_bert_sequence_classification():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForSequenceClassification(_bert_config(transformers))
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["embeddings", "layer0", "layer1", "layer2", "pooler", "classifier"]
    assert "bert.embeddings.word_embeddings.weight" in blocks["embeddings"]
    assert all(n.startswith("bert.encoder.layer.1.") for n in blocks["layer1"])
    assert blocks["classifier"] == {"classifier.weight", "classifier.bias"}
    assert_exact_partition(model)


def test_hf_tied_embeddings_counted_once():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForMaskedLM(_bert_config(transformers))
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight  # really tied
    groups = param_groups_by_block(model, trainable_only=False)
    assert [g["name"] for g in groups][0] == "embeddings"
    assert sum(p is decoder for g in groups for p in g["params"]) == 1
    assert decoder in groups[0]["params"]
    assert_exact_partition(model)
    report = trainable_report(model)
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_hf_decoder_only_language_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["embed_tokens", "layer0", "layer1", "norm", "lm_head"]
    assert blocks["lm_head"] == {"lm_head.weight"}
    assert_exact_partition(model)


def test_hf_distilbert_transformer_stack():
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(
        dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=100
    )
    model = transformers.DistilBertForSequenceClassification(config)
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["embeddings", "layer0", "layer1", "pre_classifier", "classifier"]
    assert all(n.startswith("distilbert.transformer.layer.1.") for n in blocks["layer1"])
    assert_exact_partition(model)


def test_hf_vit_layers_stack():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8,
    )
    model = transformers.ViTForImageClassification(config)
    names = block_names(model)
    assert names[:3] == ["embeddings", "layer0", "layer1"]
    assert names[-1] == "classifier"
    assert_exact_partition(model)


# --------------------------------------------------------------------------------------------------
# Sharing, wrappers, fallback
# --------------------------------------------------------------------------------------------------


def test_parameter_shared_in_two_places_counted_once():
    model = Tiny()
    model.head = nn.Linear(3, 3)
    model.head.weight = model.body[0].linear.weight  # the same Parameter in body.0 and head
    groups = param_groups_by_block(model, trainable_only=False)
    assert sum(p is model.head.weight for g in groups for p in g["params"]) == 1
    # First name wins: body.0 comes before head in named_parameters().
    assert block_of(model, "body.0.linear.weight") == "body.0"
    assert dict(named_blocks(model))["head"] == {"head.bias"}
    assert trainable_report(model).total_params == sum(p.numel() for p in model.parameters())
    assert_exact_partition(model)


def test_fallback_blocks():
    model = Tiny()
    model.scale = nn.Parameter(torch.ones(1))  # registered on the root: its own block, first
    assert block_names(model) == ["scale", *TINY_BLOCKS]
    assert_exact_partition(model)


class _ForwardingWrapper(nn.Module):
    """Forwards unknown attributes to the model, as torch.compile's OptimizedModule does."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)


@pytest.mark.parametrize("wrap", [nn.DataParallel, _ForwardingWrapper])
def test_wrappers_are_looked_through(resnet18, wrap):
    wrapped = wrap(resnet18)
    assert block_names(wrapped) == block_names(resnet18)
    # The fallback names are full paths of the wrapper's parameters.
    assert block_names(wrap(Tiny()))[0].endswith(".stem")


# --------------------------------------------------------------------------------------------------
# Fallback: a container of leaf layers is one block, a container of composite modules is split
# --------------------------------------------------------------------------------------------------


def _conv_bn(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class _Residual(nn.Module):
    """A residual block as users write it: composite, since its layers are submodules."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c, c)
        self.conv2, self.bn2 = _conv_bn(c, c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class StemStagesHead(nn.Module):
    """The common hand-written CNN: a stem of layers, a ModuleList of residual stages, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 4), nn.ReLU(), nn.MaxPool2d(2))
        self.stages = nn.ModuleList(
            [nn.Sequential(_Residual(4), _Residual(4)), nn.Sequential(_Residual(4))]
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(), nn.Linear(4, 2)
        )

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def test_fallback_stem_of_layers_is_one_block():
    model = StemStagesHead()
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["stem", "stages.0", "stages.1", "head"]
    assert blocks["stem"] == {"stem.0.weight", "stem.1.weight", "stem.1.bias"}
    assert blocks["head"] == {"head.3.weight", "head.3.bias"}
    groups = select_blocks(model, "first")  # the paper's first block: the stem and the first stage
    assert [g["name"] for g in groups] == ["stem", "stages.0"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stage = {n for n, _ in model.named_parameters() if n.startswith("stages.0.")}
    assert trainable == {"stem.0.weight", "stem.1.weight", "stem.1.bias"} | stage
    assert_exact_partition(model)


def test_fallback_parametrized_layer_is_still_a_layer():
    # weight_norm moves the weight into a "parametrizations" submodule; the conv is still a layer.
    model = StemStagesHead()
    model.stem[0] = nn.utils.parametrizations.weight_norm(model.stem[0])
    assert block_names(model) == ["stem", "stages.0", "stages.1", "head"]
    assert_exact_partition(model)


def _conv_bn_relu(c_in, c_out, *extra):
    return nn.Sequential(*_conv_bn(c_in, c_out), nn.ReLU(), *extra)


def _sequential_of_sequentials():
    return nn.Sequential(
        _conv_bn_relu(3, 4),
        _conv_bn_relu(4, 8, nn.MaxPool2d(2)),
        nn.Sequential(nn.Flatten(), nn.Linear(8, 2)),
    )


class _Holder(nn.Module):
    """A LightningModule-like wrapper: all parameters in self.net."""

    def __init__(self, net):
        super().__init__()
        self.net = net


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (_sequential_of_sequentials, ["0", "1", "2"]),
        (lambda: _Holder(_sequential_of_sequentials()), ["net.0", "net.1", "net.2"]),
        # A stage of residual blocks inside the model's Sequential is split, its stem is not.
        (
            lambda: nn.Sequential(
                _conv_bn_relu(3, 4),
                nn.Sequential(_Residual(4), _Residual(4)),
                nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
            ),
            ["0", "1.0", "1.1", "2"],
        ),
    ],
    ids=["model", "wrapped", "with-a-stage"],
)
def test_fallback_sequential_of_sequentials(build, expected):
    model = build()
    assert block_names(model) == expected
    assert_exact_partition(model)


def test_fallback_sequential_model_of_layers_and_blocks():
    # The model itself is a Sequential: conv + bn form the stem; the residual blocks stay apart.
    model = nn.Sequential(
        *_conv_bn(3, 4), nn.ReLU(),  # 0, 1, 2
        _Residual(4), _Residual(4),  # 3, 4
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),  # 5, 6, 7
    )
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["0-1", "3", "4", "7"]
    assert blocks["0-1"] == {"0.weight", "1.weight", "1.bias"}
    assert blocks["7"] == {"7.weight", "7.bias"}
    assert_exact_partition(model)


def test_fallback_sequential_model_of_layers_only_splits_per_layer():
    # With nothing else to split, the model's own layers are its blocks.
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 8), nn.Linear(8, 2)
    )
    assert block_names(model) == ["0", "3", "4"]
    assert_exact_partition(model)


def test_fallback_container_mixing_layers_and_blocks():
    """Consecutive layers form one block; each composite module is a block; pooling joins none."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                *_conv_bn(3, 4), nn.ReLU(),  # 0, 1, 2: the stem
                _Residual(4), _Residual(4),  # 3, 4
                *_conv_bn(4, 4), nn.MaxPool2d(2),  # 5, 6, 7: a transition
                _Residual(4),  # 8
            )
            self.head = nn.Linear(4, 2)

    model = Net()
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["body.0-1", "body.3", "body.4", "body.5-6", "body.8", "head"]
    assert blocks["body.5-6"] == {"body.5.weight", "body.6.weight", "body.6.bias"}
    assert_exact_partition(model)


class TinyTransformer(nn.Module):
    """Embeddings in a ModuleDict, a ModuleList of encoder layers, a final norm and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.ModuleDict({"tokens": nn.Embedding(10, 8), "positions": nn.Embedding(4, 8)})
        self.drop = nn.Dropout()
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(8, 2, 16, batch_first=True) for _ in range(3)]
        )
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)


def test_fallback_transformer():
    model = TinyTransformer()
    blocks = dict(named_blocks(model))
    assert list(blocks) == ["embed", "layers.0", "layers.1", "layers.2", "norm", "head"]
    assert blocks["embed"] == {"embed.tokens.weight", "embed.positions.weight"}
    assert all(n.startswith("layers.1.") for n in blocks["layers.1"])
    assert_exact_partition(model)


def test_fallback_torchvision_models_without_a_rule():
    # ShuffleNetV2: conv1 and conv5 are Sequentials of conv + bn + relu; stages of 4, 8, 4 units.
    shufflenet = on_meta(torchvision.models.shufflenet_v2_x0_5, weights=None)
    assert block_names(shufflenet) == [
        "conv1",
        *(f"stage2.{i}" for i in range(4)),
        *(f"stage3.{i}" for i in range(8)),
        *(f"stage4.{i}" for i in range(4)),
        "conv5",
        "fc",
    ]
    # MNASNet: layers = 3 x (conv, bn[, relu]), 6 stacks, conv + bn + relu; classifier: dropout, fc
    mnasnet = on_meta(torchvision.models.mnasnet0_5, weights=None)
    assert block_names(mnasnet) == [
        "layers.0-7", *(f"layers.{i}" for i in range(8, 14)), "layers.14-15", "classifier"
    ]
    assert_exact_partition(mnasnet)


# --------------------------------------------------------------------------------------------------
# "first": the paper's first block (the input stem with the first stage); "last": the output head
# --------------------------------------------------------------------------------------------------


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    return on_meta(timm.create_model, name, pretrained=False, **kwargs)


def _hf(config_name, model_name, **config):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))


_TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)

FIRST_AND_LAST = {
    # torchvision: conv1 + bn1 + layer1, as the paper's ImageNet ResNet-50
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), ["stem", "layer1"], "fc"),
    "wide_resnet50_2": (lambda: on_meta(torchvision.models.wide_resnet50_2), ["stem", "layer1"], "fc"),
    # the paper's CIFAR Wide-ResNet: conv1 is part of block1 already
    "robustbench_wrn": (TinyRobustBenchWRN, ["block1"], "fc"),
    "torchvision_vit": (
        lambda: torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
        ),
        ["embed", "layer0"],
        "heads",
    ),
    "convnext_tiny": (lambda: on_meta(torchvision.models.convnext_tiny), ["features.0", "features.1"], "classifier"),
    "efficientnet_b0": (lambda: on_meta(torchvision.models.efficientnet_b0), ["features.0", "features.1"], "classifier"),
    "mobilenet_v3_small": (lambda: on_meta(torchvision.models.mobilenet_v3_small), ["features.0", "features.1"], "classifier"),
    "swin_t": (lambda: on_meta(torchvision.models.swin_t), ["features.0", "features.1"], "head"),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(), ["stem", "trunk_output.block1"], "fc"),
    "densenet121": (
        lambda: on_meta(torchvision.models.densenet121),
        ["features.conv0", "features.norm0", "features.denseblock1"],
        "classifier",
    ),
    "vgg11": (lambda: on_meta(torchvision.models.vgg11), ["features.0"], "classifier"),  # no stages
    "shufflenet_fallback": (lambda: on_meta(torchvision.models.shufflenet_v2_x0_5), ["conv1", "stage2.0"], "fc"),
    # timm: its group_matcher's "stem" group and the first group after it
    "timm_resnet18": (lambda: _timm("resnet18"), ["stem", "blocks.1"], "fc"),
    "timm_vit": (lambda: _timm("vit_tiny_patch16_224", img_size=32, depth=2), ["stem", "blocks.0"], "head"),
    "timm_convnext": (lambda: _timm("convnext_atto"), ["stem", "blocks.0"], "head"),
    "timm_cait": (lambda: _timm("cait_xxs24_224", img_size=32, depth=2), ["group0"], "head"),  # function matcher
    # Hugging Face: embeddings and the first layer; the task head last
    "bert": (lambda: _hf("BertConfig", "BertForSequenceClassification", **_TINY_BERT), ["embeddings", "layer0"], "classifier"),
    "bert_bare": (lambda: _hf("BertConfig", "BertModel", **_TINY_BERT), ["embeddings", "layer0"], "pooler"),
    "llama": (
        lambda: _hf(
            "LlamaConfig", "LlamaForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, vocab_size=100,
        ),
        ["embed_tokens", "layer0"],
        "lm_head",
    ),
    # the fallback: the blocks in front of the first composite element of a split container
    "fallback_cnn": (StemStagesHead, ["stem", "stages.0"], "head"),
    "fallback_transformer": (lambda: TinyTransformer(), ["embed", "layers.0"], "head"),
    "fallback_mlp": (lambda: nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), ["0"], "2"),
    "fallback_conv_norm_unit_then_blocks": (
        lambda: nn.Sequential(_conv_bn_relu(3, 4), _Residual(4), _Residual(4), nn.Linear(4, 2)),
        ["0", "1"],
        "3",
    ),
}


@pytest.mark.parametrize("family", sorted(FIRST_AND_LAST))
def test_first_is_the_stem_with_the_first_stage_and_last_is_the_head(family):
    build, first, last = FIRST_AND_LAST[family]
    model = build()
    assert [g["name"] for g in select_blocks(model, "first")] == first
    assert _trainable_blocks(model) == first
    assert [g["name"] for g in select_blocks(model, "last")] == [last]
    assert block_names(model)[: len(first)] == first  # a prefix: the input side


def test_first_with_user_matchers():
    resnet18 = on_meta(torchvision.models.resnet18)
    # A callable matcher defines the blocks itself: "first" is its first block.
    paper = lambda name: "layer1" if name.startswith(("conv1", "bn1", "layer1")) else name.split(".")[0]
    assert [g["name"] for g in select_blocks(resnet18, "first", paper)] == ["layer1"]
    # A dict in timm's protocol names its stem "stem", as timm's own matchers do.
    timm_style = {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)"}
    assert [g["name"] for g in select_blocks(resnet18, "first", timm_style)] == ["stem", "blocks.1"]
    other = {"input": r"^conv1|^bn1", "blocks": r"^layer(\d+)"}
    assert [g["name"] for g in select_blocks(resnet18, "first", other)] == ["input"]


def test_first_through_wrappers():
    wrapped = _Holder(on_meta(torchvision.models.resnet18))
    assert [g["name"] for g in select_blocks(wrapped, "first")] == ["stem", "layer1"]
    fallback = _Holder(StemStagesHead())
    assert [g["name"] for g in select_blocks(fallback, "first")] == ["net.stem", "net.stages.0"]


# --------------------------------------------------------------------------------------------------
# Property: every parameter is in exactly one block, whatever the tree
# --------------------------------------------------------------------------------------------------

_CHILD_NAMES = ["a", "b", "fc", "features", "layer1", "encoder", "head"]
_PARAM_NAMES = ["w", "scale", "class_token"]

# Skeletons of the recognised architectures, filled with random modules, so that the property
# also covers every rule: child name -> a forced kind, a nested skeleton, or None (random).
_SKELETONS = [
    {"conv1": None, "bn1": None, "layer1": None, "layer2": None, "fc": None},
    {"conv1": None, "block1": None, "block2": None, "block3": None, "bn1": None, "fc": None},
    {"embeddings": None, "encoder": {"layer": "modulelist"}, "pooler": None, "classifier": None},
    {"bert": {"embeddings": None, "layers": "modulelist"}, "classifier": None},
    {"conv_proj": None, "encoder": {"layers": "sequential", "ln": None}, "heads": None},
    {"stem": None, "features": "sequential", "classifier": "sequential"},
]


def _random_module(data, depth, made_modules, made_params, shape=None):
    """A random module tree with shared modules and shared parameters."""
    if shape is None:
        kinds = ["linear", "no_params"] + (["reuse"] if made_modules else [])
        if depth < 3:
            kinds += ["sequential", "modulelist", "moduledict", "custom", "skeleton", "skeleton"]
        kind = data.draw(st.sampled_from(kinds))
    else:
        kind = shape if isinstance(shape, str) else "custom"
    if kind == "skeleton":
        shape = data.draw(st.sampled_from(_SKELETONS))
        kind = "custom"

    def child(child_shape=None):
        return _random_module(data, depth + 1, made_modules, made_params, child_shape)

    if kind == "reuse":  # the same module instance in a second place
        return data.draw(st.sampled_from(made_modules))
    if kind == "linear":
        sizes = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3), st.booleans()))
        module = nn.Linear(*sizes[:2], bias=sizes[2])
    elif kind == "no_params":
        module = nn.ReLU()
    elif kind in ("sequential", "modulelist"):
        children = [child() for _ in range(data.draw(st.integers(0, 3)))]
        module = nn.Sequential(*children) if kind == "sequential" else nn.ModuleList(children)
    elif kind == "moduledict":
        keys = data.draw(st.lists(st.sampled_from(_CHILD_NAMES), max_size=3, unique=True))
        module = nn.ModuleDict({key: child() for key in keys})
    else:
        module = nn.Module()
        if isinstance(shape, dict):
            names = list(shape)
        else:
            names = data.draw(st.lists(st.sampled_from(_CHILD_NAMES), max_size=3, unique=True))
        for key in names:
            module.add_module(key, child(shape[key] if isinstance(shape, dict) else None))
        for key in data.draw(st.lists(st.sampled_from(_PARAM_NAMES), max_size=2, unique=True)):
            if made_params and data.draw(st.booleans()):  # the same Parameter in a second place
                param = data.draw(st.sampled_from(made_params))
            else:
                param = nn.Parameter(torch.zeros(data.draw(st.integers(1, 3))))
            module.register_parameter(key, param)
    # Registered only once built, so a module is never reused inside itself.
    made_modules.append(module)
    made_params.extend(module.parameters(recurse=False))
    return module


_MATCHERS = [
    None,
    lambda name: name.rsplit(".", 1)[-1],  # scatters every module across blocks
    {"first": r"^a|^features", "blocks": [(r"^layer(\d+)", None), (r"^fc", (99999,))]},
]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    matcher_index=st.integers(0, len(_MATCHERS) - 1),
    root_shape=st.sampled_from([None] * 4 + _SKELETONS),
)
def test_property_every_parameter_in_exactly_one_block(data, matcher_index, root_shape):
    matcher = _MATCHERS[matcher_index]
    model = _random_module(data, 0, [], [], root_shape)
    params = list(model.parameters())
    if not params:
        with pytest.raises(ValueError, match="no parameters"):
            param_groups_by_block(model, matcher, trainable_only=False)
        return
    for param in params:
        param.requires_grad_(data.draw(st.booleans()))

    assert_exact_partition(model, matcher)

    trainable = {id(p) for p in params if p.requires_grad}
    if not trainable:
        with pytest.raises(ValueError, match="no trainable parameters"):
            param_groups_by_block(model, matcher)
    else:
        groups = param_groups_by_block(model, matcher)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) and set(ids) == trainable
        assert all(g["params"] for g in groups)

    report = trainable_report(model, matcher)
    assert report.total_params == sum(p.numel() for p in params)
    assert report.trainable_params == sum(p.numel() for p in params if p.requires_grad)

    select_blocks(model, "last", matcher)
    last = param_groups_by_block(model, matcher, trainable_only=False)[-1]["params"]
    assert {id(p) for p in params if p.requires_grad} == {id(p) for p in last}

    # "first" is a prefix of the blocks: the first block, and the next one only after a stem
    names = block_names(model, matcher)
    first = [g["name"] for g in select_blocks(model, "first", matcher)]
    assert first and first == names[: len(first)]


# --------------------------------------------------------------------------------------------------
# Property: the fallback on model shapes users write (layers, composite modules, containers)
# --------------------------------------------------------------------------------------------------

# A spec is "layer" (an nn.Linear), "free" (a module without parameters), or (kind, [child specs])
# with kind "composite" (a custom module), "seq", "list" or "dict" (containers), or "model".
_LAYER_OR_FREE = st.sampled_from(["layer", "free"])
_COMPOSITE = st.tuples(st.just("composite"), st.lists(_LAYER_OR_FREE, min_size=1, max_size=3))
_IN_CONTAINER = st.one_of(
    _LAYER_OR_FREE, _COMPOSITE, st.tuples(st.just("seq"), st.lists(_LAYER_OR_FREE, max_size=3))
)
_TOP_LEVEL = st.one_of(
    _LAYER_OR_FREE,
    _COMPOSITE,
    st.tuples(st.sampled_from(["seq", "list", "dict"]), st.lists(_IN_CONTAINER, max_size=4)),
)
_MODEL = st.tuples(st.sampled_from(["model", "seq"]), st.lists(_TOP_LEVEL, min_size=2, max_size=5))
_FREE_MODULES = [nn.ReLU, nn.Dropout, nn.Identity, lambda: nn.MaxPool1d(1)]


def _build(spec, keep_free, layers):
    """The module a spec describes (None for a dropped free one); layers collects the nn.Linear."""
    if spec == "layer":
        layers.append(nn.Linear(2, 2))
        return layers[-1]
    if spec == "free":
        return _FREE_MODULES[len(layers) % len(_FREE_MODULES)]() if keep_free else None
    kind, child_specs = spec
    # Keys come from the spec position, so both builds name a kept child alike.
    children = [(f"m{i}", _build(s, keep_free, layers)) for i, s in enumerate(child_specs)]
    children = [(key, child) for key, child in children if child is not None]
    if kind == "seq":
        return nn.Sequential(collections.OrderedDict(children))
    if kind == "list":
        return nn.ModuleList(child for _, child in children)
    if kind == "dict":
        return nn.ModuleDict(children)
    module = nn.Module()
    for key, child in children:
        module.add_module(key, child)
    return module


def _has_params(module):
    return any(True for _ in module.parameters())


def _is_composite(module):
    return any(_has_params(child) for child in module.children())


_CONTAINER_TYPES = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_MODEL)
def test_property_fallback_on_user_shapes(spec):
    layers = []
    model = _build(spec, keep_free=True, layers=layers)
    top = [child for child in model.children() if _has_params(child)]
    assume(len(top) >= 2)  # else the model is a wrapper, looked through to its one child
    groups = param_groups_by_block(model, trainable_only=False)
    block_of_param = {id(p): i for i, g in enumerate(groups) for p in g["params"]}

    def blocks_of(module):
        return {block_of_param[id(p)] for p in module.parameters()}

    def is_one_block(module):
        (block,) = blocks_of(module)
        return {id(p) for p in groups[block]["params"]} == {id(p) for p in module.parameters()}

    # Blocks are contiguous and in definition order.
    name_of = {id(p): n for n, p in model.named_parameters()}
    assert [name_of[id(p)] for g in groups for p in g["params"]] == list(name_of.values())
    assert_exact_partition(model)
    # A layer is never split.
    assert all(len(blocks_of(m)) == 1 for m in model.modules() if m in layers)
    for child in top:
        composite_children = [c for c in child.children() if _is_composite(c)]
        if isinstance(child, _CONTAINER_TYPES) and not composite_children:
            assert is_one_block(child)  # a container of layers never splits
        elif isinstance(child, _CONTAINER_TYPES):
            assert all(is_one_block(c) for c in composite_children)  # composites stay apart
        elif _is_composite(child) or spec[0] == "model" or not any(map(_is_composite, top)):
            assert is_one_block(child)
        # else: a layer of a Sequential model with composite elements, which may join the layers
        # next to it (a stem); contiguity above still keeps it apart from the composite ones.
    if spec[0] == "model":  # the model's attributes never share a block
        attribute_of = {id(p): key for key, c in model.named_children() for p in c.parameters()}
        assert all(len({attribute_of[id(p)] for p in g["params"]}) == 1 for g in groups)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_MODEL)
def test_property_parameterless_modules_do_not_change_blocks(spec):
    def partition(keep_free):
        layers = []
        model = _build(spec, keep_free, layers)
        assume(layers)
        layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
        groups = param_groups_by_block(model, trainable_only=False)
        return [sorted({layer_of[id(p)] for p in g["params"]}) for g in groups]

    assert partition(keep_free=True) == partition(keep_free=False)


# --------------------------------------------------------------------------------------------------
# select_blocks
# --------------------------------------------------------------------------------------------------


def _trainable_blocks(model):
    return [g["name"] for g in param_groups_by_block(model)]


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("first", ["stem", "body.0"]),  # the stem layer and the first composite block
        ("last", ["head"]),
        ("all", TINY_BLOCKS),
        ("body.2", ["body.2"]),
        (1, ["body.0"]),
        (-1, ["head"]),
        (slice(1, 3), ["body.0", "body.2"]),
        (slice(-2, None), ["body.2", "head"]),
        (range(0, 2), ["stem", "body.0"]),
        (["head", 0], ["stem", "head"]),  # returned in model order, not request order
        (("body.0", "body.0", -3), ["body.0"]),  # duplicates collapse
        (["last", "first"], ["stem", "body.0", "head"]),
    ],
)
def test_select_blocks_selectors(which, expected):
    model = Tiny()
    groups = select_blocks(model, which)
    assert [g["name"] for g in groups] == expected
    assert _trainable_blocks(model) == expected
    selected = {id(p) for g in groups for p in g["params"]}
    for param in model.parameters():
        assert param.requires_grad == (id(param) in selected)


def test_select_blocks_repeated_calls_and_optimizer_step():
    model = Tiny()
    select_blocks(model, "first")
    assert _trainable_blocks(model) == ["stem", "body.0"]
    groups = select_blocks(model, "last")  # blocks are computed over frozen parameters too
    assert _trainable_blocks(model) == ["head"]
    assert not model.stem.weight.requires_grad

    optimizer = torch.optim.SGD(groups, lr=0.1)
    assert optimizer.param_groups[0]["name"] == "head"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.head(model.body(model.stem(torch.randn(5, 2)))).sum().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.weight", "head.bias"}


def test_select_blocks_unknown_name_lists_blocks():
    model = Tiny()
    with pytest.raises(UnknownBlockError) as info:
        select_blocks(model, "hed")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert info.value.name == "hed" and info.value.available == TINY_BLOCKS
    message = str(info.value)
    assert message.startswith("unknown block 'hed'; did you mean 'head'?")
    assert all(name in message for name in TINY_BLOCKS) and "trainable_report" in message
    with pytest.raises(UnknownBlockError, match="unknown block 'zzz'; the model's blocks are"):
        select_blocks(model, ["stem", "zzz"])  # no close match: no guess
    assert all(p.requires_grad for p in model.parameters())  # nothing changed on error
    assert surgical_optim.UnknownBlockError is UnknownBlockError
    assert pickle.loads(pickle.dumps(info.value)).available == TINY_BLOCKS


@pytest.mark.parametrize("which", [4, -5, [0, 7], range(2, 6)])
def test_select_blocks_index_out_of_range(which):
    with pytest.raises(IndexError, match="has 4 blocks"):
        select_blocks(Tiny(), which)


@pytest.mark.parametrize("which", [True, 1.0, None, {"stem"}, ["stem", 1.5], [["stem"]]])
def test_select_blocks_bad_type(which):
    with pytest.raises(TypeError, match="block name"):
        select_blocks(Tiny(), which)


@pytest.mark.parametrize("which", [slice(3, 1), range(0), []])
def test_select_blocks_empty_selection(which):
    model = Tiny()
    with pytest.raises(ValueError, match="selects no block"):
        select_blocks(model, which)
    assert all(p.requires_grad for p in model.parameters())  # nothing changed on error


# --------------------------------------------------------------------------------------------------
# User matchers
# --------------------------------------------------------------------------------------------------


def test_dict_matcher_follows_timm_protocol(resnet18):
    matcher = {
        "stem": r"^conv1|^bn1",
        "skipped": None,  # consumes an ordinal, matches nothing
        "stages": [
            (r"^layer4\.1\.bn2", (99999,)),  # joins the group sorted before it
            (r"^layer(\d+)\.(\d+)", None),
        ],
    }
    blocks = named_blocks(resnet18, matcher)
    names = [name for name, _ in blocks]
    assert names[0] == "stem"
    assert names[1:-1] == [f"stages.{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert names[-1] == "fc"  # unmatched parameters: a last group named after their module
    last_stage = dict(blocks)["stages.4.1"]
    assert "layer4.1.bn2.weight" in last_stage and "layer4.1.conv1.weight" in last_stage
    assert_exact_partition(resnet18, matcher)


def test_dict_matcher_equals_timm_group_parameters(resnet18):
    pytest.importorskip("timm")
    from timm.models import group_parameters

    matcher = {
        "stem": r"^conv1|^bn1",
        "blocks": [
            (r"^layer(\d+)\.(\d+)\.conv", None),
            (r"^layer(\d+)\.(\d+)\.bn", (99999,)),
            (r"^layer(\d+)\.0\.downsample", (0,)),
        ],
    }
    expected = group_parameters(resnet18, matcher)
    assert [m for _, m in named_blocks(resnet18, matcher)] == [
        set(expected[k]) for k in sorted(expected)
    ]


def test_callable_matcher_orders_by_first_appearance(resnet18):
    blocks = named_blocks(resnet18, lambda name: "head" if name.startswith("fc") else "body")
    assert [name for name, _ in blocks] == ["body", "head"]
    assert blocks[1][1] == {"fc.weight", "fc.bias"}


def test_matcher_errors(resnet18):
    with pytest.raises(TypeError, match="must return the block name as a str"):
        block_names(resnet18, lambda name: 3)
    for bad in ["^conv1", 42, nn.Linear(1, 1)]:
        with pytest.raises(TypeError, match="matcher must be"):
            block_names(resnet18, bad)
    with pytest.raises(TypeError, match="regex string or a list"):
        block_names(resnet18, {"stem": 3})
    with pytest.raises(TypeError, match="pairs"):
        block_names(resnet18, {"stem": [r"^conv1"]})
    with pytest.raises(ValueError, match="capture numbers"):
        block_names(resnet18, {"x": r"^(\w+)\."})


# --------------------------------------------------------------------------------------------------
# trainable_report and errors
# --------------------------------------------------------------------------------------------------


def test_trainable_report_numbers_and_string():
    model = Tiny()
    select_blocks(model, ["stem", "head"])
    report = trainable_report(model)
    assert isinstance(report, TrainableReport)
    assert report.blocks == (
        BlockRow("stem", 9, 9),
        BlockRow("body.0", 12, 0),
        BlockRow("body.2", 16, 0),
        BlockRow("head", 5, 5),
    )
    assert (report.total_params, report.trainable_params) == (42, 14)
    assert report.percent == pytest.approx(100 * 14 / 42)
    lines = str(report).splitlines()
    assert lines[0] == "trainable params: 14 || all params: 42 || trainable%: 33.3333"
    assert lines[1].split() == ["block", "params", "trainable"]
    assert [line.split() for line in lines[2:]] == [
        ["stem", "9", "9"], ["body.0", "12", "0"], ["body.2", "16", "0"], ["head", "5", "5"]
    ]
    with pytest.raises(AttributeError):
        report.total_params = 0  # frozen


def test_trainable_report_thousands_separators(resnet18):
    first_line = str(trainable_report(resnet18)).splitlines()[0]
    assert first_line == (
        "trainable params: 11,689,512 || all params: 11,689,512 || trainable%: 100.0000"
    )


def test_model_errors():
    model = Tiny()
    for bad in [model.parameters(), model.state_dict(), None]:
        with pytest.raises(TypeError, match="pass the model itself"):
            param_groups_by_block(bad)
    with pytest.raises(ValueError, match="no parameters"):
        block_names(nn.Sequential(nn.ReLU()))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups_by_block(model)
    assert len(param_groups_by_block(model, trainable_only=False)) == 4
    assert trainable_report(model).percent == 0.0


def test_groups_feed_an_optimizer_and_drop_frozen_blocks():
    model = Tiny()
    model.body.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    groups = param_groups_by_block(model)
    assert [g["name"] for g in groups] == ["stem", "head"]
    assert groups[1]["params"] == [model.head.weight]
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    assert [g["name"] for g in optimizer.param_groups] == ["stem", "head"]

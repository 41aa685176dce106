"""A newcomer's scripts, one per supported family, written from the README alone (random weights).

Each does what the paper means: "first" tunes the paper's first block (the input stem together with
the first stage), "last" the output head; normalisation layers keep their pre-trained statistics
through ``model.train()``; the wrappers report per block. Expected blocks are written from the
architectures, not read back from the library.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surgical_optim import AutoRGN, keep_norm_eval, param_groups_by_block, select_blocks, trainable_report

torchvision = pytest.importorskip("torchvision")


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def names_under(model: torch.nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def moved(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_torchvision_resnet_first_block_with_batchnorm_kept_in_eval(one_thread):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    keep_norm_eval(model)
    groups = select_blocks(model, "first")
    opt = torch.optim.Adam(groups, lr=1e-3)

    # the paper's first block of a ResNet: conv1 + bn1 + layer1
    assert [g["name"] for g in groups] == ["stem", "layer1"]
    assert trainable_names(model) == {"conv1.weight", "bn1.weight", "bn1.bias"} | names_under(model, "layer1.")
    # conv1 3*64*7*7 + bn1 2*64, layer1: two basic blocks of two 3x3 64->64 convs and two BatchNorms
    first_block = 3 * 64 * 7 * 7 + 2 * 64 + 2 * (2 * 64 * 64 * 9 + 2 * 2 * 64)
    assert trainable_report(model).trainable_params == first_block == 157_504

    model.train()  # the usual training loop
    running = {n: b.clone() for n, b in model.named_buffers()}
    before = snapshot(model)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert all(torch.equal(b, running[n]) for n, b in model.named_buffers())  # BatchNorm statistics kept
    assert moved(model, before) == trainable_names(model)

    assert [g["name"] for g in select_blocks(model, "last")] == ["fc"]
    assert trainable_names(model) == {"fc.weight", "fc.bias"}


def _tiny_vit(timm):
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, num_classes=5
    )


def test_timm_vit_first_block_is_patch_embedding_and_first_transformer_block(one_thread):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _tiny_vit(timm)
    groups = select_blocks(model, "first")
    opt = torch.optim.AdamW(groups, lr=1e-3)

    stem = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert [g["name"] for g in groups] == ["stem", "blocks.0"]
    assert trainable_names(model) == stem | names_under(model, "blocks.0.")

    model.train()
    before = snapshot(model)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 4])).backward()
    opt.step()
    assert moved(model, before) == trainable_names(model)

    # the last block is the classifier head; the final norm belongs to the last transformer block
    assert [g["name"] for g in select_blocks(model, "last")] == ["head"]
    assert trainable_names(model) == {"head.weight", "head.bias"}
    assert keep_norm_eval(model).layers == ()  # LayerNorm only: nothing depends on the mode


def _tiny_bert(transformers):
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.5,
    )
    return transformers.BertForSequenceClassification(config)


def test_hf_bert_first_block_is_embeddings_and_first_layer_and_dropout_stays_on(one_thread):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _tiny_bert(transformers)
    keep_norm_eval(model)  # harmless on a transformer: LayerNorm has no running statistics
    groups = select_blocks(model, "first")

    assert [g["name"] for g in groups] == ["embeddings", "layer0"]
    assert trainable_names(model) == names_under(model, "bert.embeddings.", "bert.encoder.layer.0.")
    assert [g["name"] for g in select_blocks(model, "last")] == ["classifier"]
    assert trainable_names(model) == {"classifier.weight", "classifier.bias"}

    # fine-tune everything with Auto-RGN; model.train() keeps dropout on
    select_blocks(model, "all")
    opt = AutoRGN(torch.optim.AdamW(param_groups_by_block(model), lr=1e-3))
    assert opt.multipliers().eq(1).all()  # before the first step: every tensor at the full lr
    model.train()
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    logits = [model(input_ids=ids).logits for _ in range(2)]
    assert not torch.equal(logits[0], logits[1])  # dropout is active
    F.cross_entropy(logits[0], torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    summary = opt.block_summary()
    assert [row["name"] for row in summary] == [
        "embeddings", "layer0", "layer1", "layer2", "pooler", "classifier"
    ]
    text = str(summary)
    assert all(name in text.split() for name in ("embeddings", "layer2", "classifier"))
    assert max(row["max_score"] for row in summary) == 1.0

"""Checkpoint layouts: official `.pth` and Hugging Face folders round-trip through `groupvit convert` unchanged, key
accounting is strict (names the tensor and both shapes), the documented leftovers load, nothing is unpickled."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import groupvit
from groupvit.checkpoint import convert, export_hf, export_official, keymap, save_pretrained
from groupvit.checkpoint.configs import config_from_hf, config_to_dict, config_to_hf
from groupvit.errors import ConfigError, DataError
from groupvit.model.config import ModelConfig
from groupvit.model.groupvit import GroupViT
from groupvit.model.vision import resize_pos_embed
from pipelines import cli

# A small vocabulary and context keep model construction fast; the names and shapes logic is the same.
CFG = ModelConfig(preset="tiny", vocab_size=1000, context_length=16)
ARCH_FIELDS = ("image_size", "patch_size", "embed_dim", "depths", "num_heads", "num_group_tokens",
               "num_output_groups", "mlp_ratio", "text_width", "text_layers", "text_heads", "context_length",
               "vocab_size", "output_dim", "proj_hidden_dim", "multi_label")


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in ARCH_FIELDS)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GroupViT(CFG)
    with torch.no_grad():  # distinct BatchNorm statistics and logit scales, so that carrying them is tested
        m.img_projector.linear_hidden[1].running_mean.normal_()
        m.text_projector.linear_hidden[1].running_var.uniform_(0.5, 2)
        m.img_projector.linear_hidden[1].num_batches_tracked.fill_(7)
        m.logit_scale.fill_(3.1)
        m.multi_label_logit_scale.fill_(2.2)
    return m.eval()


@pytest.fixture(scope="module")
def official(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "released.pth"
    export_official(model, path)
    return path


def official_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_official_layout_written(model, official):
    state = official_state(official)
    assert state["img_projector.linear_out.weight"].shape == (CFG.output_dim, CFG.proj_hidden_dim, 1)  # Conv1d
    assert state["img_encoder.layers.0.blocks.0.attn.qkv.weight"].shape == (3 * CFG.embed_dim, CFG.embed_dim)
    assert "text_encoder.transformer.resblocks.0.attn.in_proj_weight" in state
    assert sorted(state) == sorted(model.state_dict())


@pytest.mark.parametrize("source", ["official", "hf", "groupvit"])
def test_load_pretrained_every_layout(model, official, tmp_path, source):
    path = {"official": official, "hf": tmp_path / "hf", "groupvit": tmp_path / "ours"}[source]
    if source == "hf":
        export_hf(model, path)
    elif source == "groupvit":
        save_pretrained(model, path)
    loaded = groupvit.load_pretrained(path)
    assert not loaded.training and same_architecture(loaded.cfg, CFG)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    pixels, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 998, (2, 16))
    tokens[:, 9] = 999  # the largest id marks the pooled (EOT) position
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens))


def test_official_round_trip_through_hf_cli(official, tmp_path):
    hf_dir, back = tmp_path / "hf", tmp_path / "back.pth"
    assert cli.main(["convert", str(official), str(hf_dir), "--to", "hf"]) == 0
    assert cli.main(["convert", str(hf_dir), str(back)]) == 0  # .pth -> official layout by default
    assert_same_tensors(official_state(back), official_state(official))
    ours, again = tmp_path / "ours", tmp_path / "again.pth"
    assert cli.main(["convert", str(official), str(ours)]) == 0  # a folder -> our layout by default
    assert cli.main(["convert", str(ours), str(again)]) == 0
    assert_same_tensors(official_state(again), official_state(official))


def test_hf_round_trip_and_transformers_loads_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GroupViTConfig.from_dict(config_to_hf(CFG))
    hf = transformers.GroupViTModel(hf_cfg)
    hf.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    original = load_file(tmp_path / "hf" / "model.safetensors")
    assert_same_tensors(load_file(tmp_path / "hf2" / "model.safetensors"), original)
    _, info = transformers.GroupViTModel.from_pretrained(tmp_path / "hf2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_hf_config_round_trip():
    cfg = config_from_hf(config_to_hf(CFG, multi_label_logit_scale=2.0), "config.json")
    assert same_architecture(cfg, CFG)
    assert math.isclose(cfg.contrast_temperature, CFG.contrast_temperature)


@pytest.mark.parametrize("change, key", [(dict(hard_assignment=False), "model.hard_assignment"),
                                         (dict(group_residual=0.3), "model.group_residual")])
def test_hf_export_refuses_what_the_hf_model_cannot_compute(change, key, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(CFG, **change)
    with pytest.raises(ConfigError, match=key):
        config_to_hf(cfg)
    with pytest.raises(ConfigError, match=key):
        export_hf(GroupViT(cfg), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_key_map_is_a_bijection(model):
    state = model.state_dict()
    hf = keymap.ours_to_hf(state)
    assert len(hf) == len(state) - 1 + 2 * 2 * (sum(CFG.depths) + CFG.text_layers)  # minus ML scale; +2 per fused w, b
    back, unexpected, missing = keymap.hf_to_ours(hf)
    assert not unexpected and not missing
    assert_same_tensors(back, {k: v for k, v in state.items() if k != "multi_label_logit_scale"})
    assert keymap.hf_names("img_encoder.layers.1.blocks.0.attn.qkv.bias") == [
        f"vision_model.encoder.stages.1.layers.0.self_attn.{x}_proj.bias" for x in "qkv"]
    assert keymap.hf_names("text_projector.linear_out.weight") == ["text_projection.3.weight"]


def test_missing_unexpected_and_misshaped_are_named(model, official, tmp_path):
    state = official_state(official)
    del state["img_encoder.layers.0.downsample.assign.k_proj.weight"]
    state["img_encoder.extra.weight"] = torch.zeros(3)
    state["text_encoder.ln_final.weight"] = torch.zeros(7)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(DataError) as e:
        groupvit.load_pretrained(tmp_path / "bad.pth", config=CFG)
    msg = str(e.value)
    assert "img_encoder.layers.0.downsample.assign.k_proj.weight" in msg and "img_encoder.extra.weight" in msg
    assert "text_encoder.ln_final.weight: checkpoint [7] vs model [128]" in msg


def test_other_architecture_names_first_mismatch(official):
    other = ModelConfig(preset="tiny", vocab_size=1000, context_length=16, embed_dim=64, num_heads=(2, 2, 2))
    with pytest.raises(DataError, match=r"mis-shaped: img_encoder\.pos_embed: checkpoint \[1, 64, 128\] vs model "
                                        r"\[1, 64, 64\]; img_encoder\.patch_embed\.proj\.weight"):
        groupvit.load_pretrained(official, config=other)


def test_hf_incomplete_qkv_names_the_hf_tensor(model, tmp_path):
    export_hf(model, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    del state["text_model.encoder.layers.1.self_attn.k_proj.bias"]
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # documented leftover: ignored
    from safetensors.torch import save_file
    save_file(state, weights)
    with pytest.raises(DataError, match=r"\(1 missing, 0 unexpected, 0 mis-shaped tensors\)\n"
                                        r"  missing: text_model\.encoder\.layers\.1\.self_attn\.k_proj\.bias$"):
        groupvit.load_pretrained(tmp_path / "hf")


def test_leftovers_multi_label_scale_and_position_ids(model, official, tmp_path):
    state = official_state(official)
    del state["multi_label_logit_scale"]  # the RedCaps release has none
    torch.save({"model": state}, tmp_path / "redcaps.pth")
    inferred = groupvit.load_pretrained(tmp_path / "redcaps.pth")  # no config: inferred from shapes
    assert inferred.multi_label_logit_scale is None and not inferred.cfg.multi_label
    configured = groupvit.load_pretrained(tmp_path / "redcaps.pth", config=CFG)
    assert configured.multi_label_logit_scale is not None  # keeps its initial value
    assert torch.equal(configured.logit_scale, model.logit_scale)
    no_ml = ModelConfig(preset="tiny", vocab_size=1000, context_length=16, multi_label=False)
    assert groupvit.load_pretrained(official, config=no_ml).multi_label_logit_scale is None  # dropped


def test_architecture_inferred_from_shapes(tmp_path):
    cfg = ModelConfig(preset="tiny", vocab_size=1000, context_length=16, num_heads=(2, 2, 2), text_heads=2)
    torch.save({"model": keymap.ours_to_official(GroupViT(cfg).state_dict())}, tmp_path / "bare.pth")  # no config
    assert same_architecture(groupvit.load_pretrained(tmp_path / "bare.pth").cfg, cfg)


def test_pos_embed_of_another_grid_is_resized(model, official):
    small = ModelConfig(preset="tiny", vocab_size=1000, context_length=16, image_size=32)  # grid 4x4, not 8x8
    loaded = groupvit.load_pretrained(official, config=small)
    expected = resize_pos_embed(model.img_encoder.pos_embed.detach(), (8, 8), (4, 4))
    assert torch.equal(loaded.img_encoder.pos_embed.detach(), expected)


class TrainConfig:
    """Stands for the reference's OmegaConf config pickled beside the weights; unpickling it would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        open(state["marker"], "w").close()


class Exploit:
    """A pickle that runs a shell command when a plain `torch.load` unpickles it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_foreign_objects_are_never_unpickled(model, tmp_path):
    marker = tmp_path / "ran"
    state = keymap.ours_to_official(model.state_dict())
    torch.save({"model": state, "config": TrainConfig(marker), "epoch": 30, "metrics": {"acc": 0.4}},
               tmp_path / "train.pth")
    loaded = groupvit.load_pretrained(tmp_path / "train.pth", config=CFG)  # the weights load, the object is inert
    assert not marker.exists()
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    torch.save({"model": state, "config": Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(DataError, match="refused"):
        groupvit.load_pretrained(tmp_path / "evil.pth", config=CFG)
    assert not marker.exists()


def test_reference_training_checkpoint_with_omegaconf_config(model, tmp_path):
    omegaconf = pytest.importorskip("omegaconf")  # how NVlabs/GroupViT saves: config, optimizer, metrics, epoch
    cfg = omegaconf.OmegaConf.create({"model": {"img_encoder": {"embed_dim": 128, "depths": [2, 2, 1]}}})
    state = keymap.ours_to_official(model.state_dict())
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "config": cfg,
                "epoch": 29, "metrics": {"max_accuracy": 43.7}}, tmp_path / "ckpt_epoch_29.pth")
    loaded = groupvit.load_pretrained(tmp_path / "ckpt_epoch_29.pth", config=CFG)
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(DataError, match="not a readable PyTorch checkpoint"):
        groupvit.load_pretrained(tmp_path / "notes.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        groupvit.load_pretrained(tmp_path / "empty")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    assert cli.main(["convert", str(tmp_path / "foreign.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "img_encoder" in err and "foo.weight" in err


def test_failed_conversion_keeps_the_previous_output(model, official, tmp_path):
    dst = tmp_path / "ours"
    save_pretrained(model, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    state = official_state(official)
    del state["logit_scale"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(DataError, match="logit_scale"):
        convert(tmp_path / "broken.pth", dst, config=CFG)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth", "ours"]  # no temporary left behind
    assert json.loads((dst / "config.json").read_text())["embed_dim"] == CFG.embed_dim


def test_documented_key_map_matches_the_code():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "checkpoints.md").read_text()
    for ours, hf in keymap.RULES:
        assert f"| `{ours}` | `{hf}` |" in doc, ours


def test_reads_the_trainers_model_folder_and_prefixed_keys(model, tmp_path):
    from groupvit.config import save_resolved

    # what `groupvit train` writes as data/model
    save_pretrained(model, tmp_path / "model", extra=lambda tmp: save_resolved(tmp / "resolved_config.yaml", model=CFG))
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors",
                                                                      "resolved_config.yaml"]
    assert_same_tensors(groupvit.load_pretrained(tmp_path / "model").state_dict(), model.state_dict())
    ddp = {f"module.{k}": v for k, v in keymap.ours_to_official(model.state_dict()).items()}
    torch.save({"model": ddp}, tmp_path / "ddp.pth")
    assert_same_tensors(groupvit.load_pretrained(tmp_path / "ddp.pth", config=CFG).state_dict(), model.state_dict())


def test_the_model_folder_writer_keeps_the_trainers_bytes(model, tmp_path):
    """One writer for `groupvit train`'s data/model, `save_pretrained` and `groupvit convert`: config.json is the
    ModelConfig in field order (the bytes the train stage always wrote, so data/model keeps its DVC hash); the HF
    layout keeps transformers' sorted keys."""
    from safetensors.torch import save as safetensors_bytes

    save_pretrained(model, tmp_path / "ours")
    assert (tmp_path / "ours/config.json").read_text() == json.dumps(config_to_dict(CFG), indent=2) + "\n"
    fp32 = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
            for k, v in model.state_dict().items()}  # the trainer's former save_model
    assert (tmp_path / "ours/model.safetensors").read_bytes() == safetensors_bytes(fp32, metadata={"format": "pt"})
    export_hf(model, tmp_path / "hf")
    text = (tmp_path / "hf/config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_both_config_json_key_orders_load(model, tmp_path):
    """`groupvit convert` wrote config.json with sorted keys before it shared the trainer's writer: both forms load."""
    save_pretrained(model, tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    config = json.loads((tmp_path / "new/config.json").read_text())
    (tmp_path / "old/config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    assert (tmp_path / "old/config.json").read_text() != (tmp_path / "new/config.json").read_text()
    for form in ("old", "new"):
        loaded = groupvit.load_pretrained(tmp_path / form)
        assert loaded.cfg == CFG
        assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_a_failed_model_folder_write_keeps_the_previous_folder(model, tmp_path):
    save_pretrained(model, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}

    def fails(tmp):
        (tmp / "resolved_config.yaml").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        save_pretrained(model, tmp_path / "model", extra=fails)
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind


def test_cli_architecture_options(tmp_path):
    torch.manual_seed(0)
    bare = tmp_path / "bare.pth"
    torch.save({"model": keymap.ours_to_official(GroupViT(CFG).state_dict())}, bare)  # 4 heads; shapes say 128/64
    (tmp_path / "cfg.json").write_text(json.dumps(config_to_dict(CFG)))
    assert cli.main(["convert", str(bare), str(tmp_path / "guessed")]) == 0
    assert json.loads((tmp_path / "guessed" / "config.json").read_text())["num_heads"] == [2, 2, 2]
    assert cli.main(["convert", str(bare), str(tmp_path / "given"), "--config", str(tmp_path / "cfg.json")]) == 0
    assert json.loads((tmp_path / "given" / "config.json").read_text())["num_heads"] == [4, 4, 4]
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dims": 3}))
    assert cli.main(["convert", str(bare), str(tmp_path / "x"), "--config", str(tmp_path / "bad.json")]) == 2


# ---- the reference's training checkpoint: architecture from its embedded OmegaConf config -------------------------

def reference_config(cfg: ModelConfig, **img_encoder):
    """The training config NVlabs/GroupViT pickles into its checkpoints (an OmegaConf DictConfig, read-only, with the
    `multi_label` interpolation of its yaml files), for the architecture `cfg`."""
    omegaconf = pytest.importorskip("omegaconf")
    vision = dict(type="GroupViT", img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                  num_heads=list(cfg.num_heads), depths=list(cfg.depths), num_group_tokens=list(cfg.num_group_tokens),
                  num_output_groups=list(cfg.num_output_groups), drop_rate=0.0, drop_path_rate=0.1, **img_encoder)
    oc = omegaconf.OmegaConf.create({
        "data": {"batch_size": 256, "seed": "${train.seed}", "text_aug": {"max_seq_len": 77, "multi_label": 3}},
        "train": {"seed": 0, "epochs": 30, "base_lr": 1.6e-3, "amp_opt_level": "O1"},
        "model": {"type": "MultiLabelContrastive", "img_encoder": vision,
                  "text_encoder": {"type": "TextTransformer", "context_length": cfg.context_length,
                                   "width": cfg.text_width, "layers": cfg.text_layers, "vocab_size": cfg.vocab_size},
                  "contrast_temperature": 0.07, "proj_num_layers": 2, "output_dim": cfg.output_dim,
                  "multi_label": "${data.text_aug.multi_label}"},
        "checkpoint": {"resume": "", "max_kept": -1}, "output": "???", "model_name": "group_vit_bs256x8"})
    omegaconf.OmegaConf.set_struct(oc, True)
    omegaconf.OmegaConf.set_readonly(oc, True)
    return oc


def save_reference_checkpoint(model: GroupViT, path, config) -> None:
    """What the reference's `save_checkpoint` writes: weights, optimizer, scheduler, metrics (mmseg's mIoU is a numpy
    float), epoch and the training config in one pickle."""
    import numpy as np

    metrics = {"max_accuracy": 43.7, "max_miou": np.float64(52.3)}
    torch.save({"model": keymap.ours_to_official(model.state_dict()),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "weight_decay": 0.05}]},
                "lr_scheduler": {"t_initial": 30, "warmup_t": 2}, "metrics": metrics, "epoch": 29, "config": config,
                **metrics}, path)


@pytest.mark.parametrize("change", [dict(num_heads=(4, 4, 4)), dict(num_heads=(2, 2, 2), hard_assignment=False)],
                         ids=["4_heads_at_width_128", "soft_assignment"])
def test_reference_checkpoint_loads_the_architecture_it_was_trained_with(change, tmp_path):
    """Heads and the assignment mode are not in the tensor shapes: width / 64 = 2 heads and hard assignment would load
    without error and compute something else. The embedded training config says what the model was."""
    import dataclasses

    # The reference's projection heads are 4096 wide (MultiLabelContrastive never sets ProjectMLP's inner_dim).
    cfg = dataclasses.replace(CFG, proj_hidden_dim=4096, drop_path_rate=0.1, **change)
    torch.manual_seed(0)
    source = GroupViT(cfg).eval()
    extra = {} if cfg.hard_assignment else {"hard_assignment": False}
    save_reference_checkpoint(source, tmp_path / "ckpt_epoch_29.pth", reference_config(cfg, **extra))
    loaded = groupvit.load_pretrained(tmp_path / "ckpt_epoch_29.pth")  # no config= given
    assert loaded.cfg.num_heads == cfg.num_heads and loaded.cfg.hard_assignment == cfg.hard_assignment
    assert same_architecture(loaded.cfg, cfg) and loaded.cfg.multi_label  # multi_label: ${data.text_aug.multi_label}
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = source.segmentation_outputs(pixels), loaded.segmentation_outputs(pixels)
    for a, b in zip(want["soft_maps"], got["soft_maps"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(want["groups"], got["groups"]) and torch.equal(want["image"], got["image"])
    # the converted folder keeps that architecture (our config.json)
    assert cli.main(["convert", str(tmp_path / "ckpt_epoch_29.pth"), str(tmp_path / "ours")]) == 0
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["num_heads"] == list(cfg.num_heads) and written["hard_assignment"] == cfg.hard_assignment


def test_reference_config_with_an_object_is_refused_without_running_it(model, tmp_path, capsys):
    omegaconf = pytest.importorskip("omegaconf")
    marker = tmp_path / "ran"
    oc = reference_config(CFG)
    with omegaconf.open_dict(oc), omegaconf.read_write(oc):  # a value that is an arbitrary object
        oc._set_flag("allow_objects", True)
        oc.train.hook = TrainConfig(marker)  # unpickling it runs its __setstate__, which creates `marker`
    save_reference_checkpoint(model, tmp_path / "hooked.pth", oc)
    with pytest.raises(DataError, match=r"hooked\.pth \['config'\]\.train\.hook: holds a pickled .*TrainConfig, which "
                                        r"the config reader does not admit"):
        groupvit.load_pretrained(tmp_path / "hooked.pth")
    assert cli.main(["convert", str(tmp_path / "hooked.pth"), str(tmp_path / "out")]) == 2
    assert "hooked.pth ['config'].train.hook" in capsys.readouterr().err and not (tmp_path / "out").exists()
    save_reference_checkpoint(model, tmp_path / "plain_object.pth", TrainConfig(marker))  # not an OmegaConf config
    with pytest.raises(DataError, match="TrainConfig, which the config reader does not admit"):
        groupvit.load_pretrained(tmp_path / "plain_object.pth")
    assert not marker.exists()
    # with the architecture given, the config is not needed and the weights load (the object stays inert)
    assert_same_tensors(groupvit.load_pretrained(tmp_path / "hooked.pth", config=CFG).state_dict(),
                        model.state_dict())
    assert not marker.exists()


@pytest.mark.parametrize("img_encoder, key", [(dict(pos_embed_type="fourier"), "model.img_encoder.pos_embed_type"),
                                              (dict(qkv_bias=False), "model.img_encoder.qkv_bias"),
                                              (dict(embed_factors=[1, 2, 2]), "model.img_encoder.embed_factors"),
                                              (dict(num_stages=3), "model.img_encoder.num_stages")])
def test_reference_config_this_model_cannot_compute_is_refused(model, img_encoder, key, tmp_path):
    save_reference_checkpoint(model, tmp_path / "other.pth", reference_config(CFG, **img_encoder))
    with pytest.raises(ConfigError, match=rf"other\.pth \['config'\]: {key}"):
        groupvit.load_pretrained(tmp_path / "other.pth")


# ---- truncated and corrupt files: one line naming the file, exit 2 -------------------------------------------------

def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("layout", ["groupvit", "hf", "official"])
def test_truncated_checkpoint_is_a_named_error(model, tmp_path, layout, capsys):
    src = {"groupvit": tmp_path / "ours", "hf": tmp_path / "hf", "official": tmp_path / "released.pth"}[layout]
    {"groupvit": save_pretrained, "hf": export_hf, "official": export_official}[layout](model, src)
    broken = src if layout == "official" else src / "model.safetensors"
    truncate(broken)
    with pytest.raises(DataError, match=rf"{broken.name}: not a readable .* truncated or corrupt") as e:
        groupvit.load_pretrained(src)
    assert type(e.value).__name__ == "CheckpointError"
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken}: not a readable") and err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "out").exists()


def test_corrupt_config_json_is_a_named_error(model, tmp_path, capsys):
    save_pretrained(model, tmp_path / "ours")
    export_hf(model, tmp_path / "hf")
    (tmp_path / "ours" / "config.json").write_bytes(b"\xff\xfe\x00{\"embed")  # binary garbage, not UTF-8
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "groupvit", "vision_config": "big"}))
    for folder in ("ours", "hf"):
        assert cli.main(["convert", str(tmp_path / folder), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / folder}") and "config" in err and err.count("\n") == 1

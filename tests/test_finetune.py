"""Fine-tuning: init_from (published names, weight files, workdirs), the classifier
re-initialised when the class count differs, frozen layers and a lower backbone rate
through optax.multi_transform, and export back to PyTorch."""

import json
import logging

import jax
import numpy as np
import optax
import pytest
from conftest import CONFIGS, random_variables, run_cli, tiny_torchvision, torch_input

from vgg_jax import (
    checkpoint,
    config_checks,
    configuration,
    inference,
    models,
    optim,
    pretrained,
    spec,
    train,
)
from vgg_jax.configuration import load_config_file
from vgg_jax.data import DatasetInfo

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"init_from": "torchvision:vgg17"}, "is not one of torchvision:vgg11"),
        ({"init_from": "/no/such/weights.pth"}, "no such file or folder"),
        ({"freeze": "block"}, "is not 'none', 'features' or 'blockN'"),
        ({"freeze": "block6"}, "'block6' but the model has 5 blocks"),
        ({"backbone_lr_factor": 0.0}, "outside (0, 1]"),
        ({"backbone_lr_factor": 1.5}, "outside (0, 1]"),
        ({"init_from": "torchvision:vgg16_bn", "model": "vgg11"}, "needs model='vgg16'"),
        ({"init_from": "keras:vgg19", "batch_norm": True}, "needs model='vgg19', batch_norm=False"),
    ],
)
def test_fine_tuning_fields_are_checked_in_one_line(overrides, message):
    config = configuration.default_config()
    config.update(overrides)
    problems = config_checks.problems(config)
    assert any(message in problem for problem in problems), problems


def test_finetune_preset_is_consistent():
    config = load_config_file(CONFIGS / "vgg16_finetune.py")
    config_checks.validate(config)
    assert (config.init_from, config.head, config.image_size) == (
        "torchvision:vgg16_bn",
        "torchvision",
        224,
    )


# -------------------------------------------------------------------------- optimiser


def _tiny_params():
    model = models.create_model("vgg_tiny", 3, head="cifar")
    return random_variables(model, 16)["params"]


def _one_update(config, params, grads):
    tx = optim.create_optimizer(config, optax.constant_schedule(1.0))
    # Jitted: one compilation, not one per eager operation on each leaf.
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def test_frozen_blocks_get_no_update_and_the_backbone_a_scaled_one():
    config = configuration.default_config()
    config.update(l2=0.0, momentum=0.0, freeze="block1", backbone_lr_factor=0.25)
    params = _tiny_params()
    groups = optim.param_groups(params, "block1")
    assert groups["conv1_1"]["kernel"] == groups["bn1_1"]["scale"] == "frozen"
    assert groups["conv2_1"]["kernel"] == groups["bn3_1"]["bias"] == "backbone"
    assert groups["fc1"]["kernel"] == groups["fc_bn1"]["scale"] == "head"
    grads = jax.tree.map(np.ones_like, params)
    updates = _one_update(config, params, grads)
    expected = {"frozen": 0.0, "backbone": -0.25, "head": -1.0}
    jax.tree.map(lambda u, g: np.testing.assert_array_equal(u, expected[g]), updates, groups)
    assert optim.param_groups(params, "features")["conv3_1"]["kernel"] == "frozen"


def test_frozen_gradients_do_not_count_towards_the_clipping_norm():
    config = configuration.default_config()
    config.update(l2=0.0, momentum=0.0, freeze="features", grad_clip_norm=1e6)
    params = _tiny_params()
    groups = optim.param_groups(params, "features")
    # Huge frozen gradients would make the clip scale the head's update down.
    grads = jax.tree.map(
        lambda p, g: np.full_like(p, 1e9 if g == "frozen" else 1.0), params, groups
    )
    updates = _one_update(config, params, grads)
    np.testing.assert_array_equal(updates["classifier"]["kernel"], -1.0)


def test_without_fine_tuning_the_optimiser_state_keeps_its_old_layout():
    config = configuration.default_config()
    params = _tiny_params()
    tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
    old = optax.chain(
        optax.add_decayed_weights(config.l2),
        optax.trace(decay=config.momentum, nesterov=config.nesterov),
        optax.scale_by_learning_rate(optax.constant_schedule(0.1)),
    )
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(old.init(params))


# ------------------------------------------------------------------------ merging weights


def test_merge_reinitialises_a_classifier_of_another_class_count():
    source_model = models.create_model("vgg_tiny", 10, head="cifar")
    target_model = models.create_model("vgg_tiny", 3, head="cifar")
    source = random_variables(source_model, 16, seed=1)
    target = random_variables(target_model, 16, seed=2)
    merged, notes = pretrained.merge_variables(target, source)
    np.testing.assert_array_equal(
        merged["params"]["conv2_1"]["kernel"], source["params"]["conv2_1"]["kernel"]
    )
    np.testing.assert_array_equal(
        merged["batch_stats"]["bn2_1"]["mean"], source["batch_stats"]["bn2_1"]["mean"]
    )
    np.testing.assert_array_equal(
        merged["params"]["classifier"]["kernel"], target["params"]["classifier"]["kernel"]
    )
    assert "classifier re-initialised: the source has 10 classes, this dataset 3" in notes
    assert notes[0] == f"{len(target['params']) - 1} of {len(target['params'])} layers loaded"


def test_merge_refuses_other_convolutions():
    source = random_variables(models.create_model("vgg_tiny", 3, width=0.5), 16)
    target = random_variables(models.create_model("vgg_tiny", 3), 16)
    with pytest.raises(pretrained.WeightFormatError, match=r"bn1_1 is bias \(8,\), scale"):
        pretrained.merge_variables(target, source)
    source = random_variables(models.create_model("vgg_tiny", 3, batch_norm=False), 16)
    with pytest.raises(pretrained.WeightFormatError, match="only here: \\['bn1_1'"):
        pretrained.merge_variables(target, source)


# --------------------------------------------------------------------- init_from runs


def _stored_info(workdir) -> DatasetInfo:
    located = checkpoint.locate(str(workdir))
    manager = checkpoint.create_manager(located.directory, read_only=True)
    meta = checkpoint.read_meta(manager, located.step)
    manager.close()
    return DatasetInfo.from_json(meta["dataset"])


def test_fine_tune_from_another_workdir_on_an_image_folder(tmp_path, image_folder, caplog):
    config = load_config_file(CONFIGS / "smoke.py")
    names = tuple(f"class_{i}" for i in range(10))
    source_info = DatasetInfo(names, (90.0, 100.0, 110.0), (50.0,) * 3, 16, 1, 1)
    source = random_variables(models.build_model(config, source_info), 16)
    _write_checkpoint(tmp_path / "source", config, source, source_info)
    config.update(
        dataset="image_folder",
        data_dir=str(image_folder),
        num_epochs=1,
        batch_size=8,
        progress_bar=False,
        init_from=str(tmp_path / "source"),
        freeze="block1",
        backbone_lr_factor=0.5,
    )
    with caplog.at_level(logging.INFO, logger="vgg_jax"):
        state = train.train_and_evaluate(config, str(tmp_path / "tuned"))
    assert "classifier re-initialised: the source has 10 classes, this dataset 3" in caplog.text
    tuned = jax.device_get(state.params)
    np.testing.assert_array_equal(tuned["conv1_1"]["kernel"], source["params"]["conv1_1"]["kernel"])
    assert not np.array_equal(tuned["conv2_1"]["kernel"], source["params"]["conv2_1"]["kernel"])
    # The source's normalisation travels with its weights into the new run's checkpoint.
    tuned_info = _stored_info(tmp_path / "tuned")
    assert (tuned_info.mean, tuned_info.std) == (source_info.mean, source_info.std)
    assert tuned_info.class_names == ("cat", "dog", "frog")


@pytest.mark.slow
def test_readme_fine_tune_command_from_a_torchvision_file(tmp_path, image_folder):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    reference = tiny_torchvision(spec.STAGES["vgg_tiny"], batch_norm=True, num_classes=1000)
    torch.save(reference.state_dict(), tmp_path / "vgg_tiny_bn.pth")
    result = run_cli(
        "vgg_jax.main",
        f"--config={CONFIGS / 'vgg16_finetune.py'}",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data_dir={image_folder}",
        f"--config.init_from={tmp_path / 'vgg_tiny_bn.pth'}",
        # A model this machine trains in seconds, in place of VGG16 at 224 pixels.
        "--config.model=vgg_tiny",
        "--config.image_size=16",
        "--config.batch_size=8",
        "--config.num_epochs=1",
        "--config.warmup_epochs=0.5",
        "--config.progress_bar=False",
        env={"JAX_NUM_CPU_DEVICES": "1"},  # one device: what a laptop has
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "classifier re-initialised: the source has 1000 classes, this dataset 3" in result.stderr
    assert "epoch 1/1" in result.stderr
    info = inference.load(tmp_path / "run").info
    assert info.mean == spec.IMAGENET_MEAN  # torchvision's preprocessing came along


@pytest.mark.slow
def test_readme_fine_tune_command_offline_fails_in_one_line(tmp_path, image_folder):
    result = run_cli(
        "vgg_jax.main",
        f"--config={CONFIGS / 'vgg16_finetune.py'}",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data_dir={image_folder}",
        "--config.batch_size=8",  # the test folder is smaller than one batch of 32
        env={"VGG_JAX_CACHE": str(tmp_path / "cache"), "VGG_JAX_OFFLINE": "1"},
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert pretrained.WEIGHT_FILES["torchvision:vgg16_bn"].url in lines[0]
    assert str(tmp_path / "cache" / "vgg16_bn-6c64b313.pth") in lines[0]


# ----------------------------------------------------------------------------- export


def test_cifar_head_exports_for_the_torch_twin(tmp_path):
    torch = pytest.importorskip("torch")
    from vgg_jax.bench import torch_reference

    model = models.create_model("vgg_tiny", 3, head="cifar", mean=(100.0,) * 3, std=(50.0,) * 3)
    variables = random_variables(model, 16)
    state, layout = pretrained.export_state_dict(model, variables, 16)
    assert layout == "torch_reference"
    pretrained.write_state_dict(state, tmp_path / "tiny.pth", "torchvision", {"layout": layout})
    twin = torch_reference.build_torch_model(model, 16)
    twin.load_state_dict(torch.load(tmp_path / "tiny.pth", weights_only=True), strict=True)
    batch = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        theirs = twin.eval()(torch.from_numpy(batch)).numpy()
    ours = np.asarray(jax.jit(model.apply)(variables, batch))
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert json.loads((tmp_path / "tiny.pth.json").read_text())["layout"] == "torch_reference"


def _write_checkpoint(workdir, config, variables, info):
    """A checkpoint of `variables`, as training would leave it (without training)."""
    model = models.build_model(config, info)
    tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
    state = train.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(str(workdir)), async_save=False)
    meta = {"schema": checkpoint.META_SCHEMA, "dataset": info.to_json(), "steps_per_epoch": 1}
    checkpoint.save(manager, state, config, {**meta, "epoch": 1, "step_in_epoch": 0})
    manager.wait_until_finished()
    manager.close()


@pytest.mark.slow
def test_exported_vgg16_bn_loads_strictly_in_torchvision_and_gives_our_logits(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    mean, std = (110.0, 120.0, 100.0), (60.0,) * 3
    model = models.vgg16_bn(7, head="torchvision", mean=mean, std=std)
    variables = random_variables(model, 32)
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ours = np.asarray(jax.jit(model.apply)(variables, batch))
    state, layout = pretrained.export_state_dict(model, variables, 32)
    assert layout == "torchvision"
    for file_format, name in (("torchvision", "out.pth"), ("safetensors", "out.safetensors")):
        pretrained.write_state_dict(state, tmp_path / name, file_format, {"mean": list(mean)})
        if file_format == "safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(tmp_path / name)
        else:
            state_dict = torch.load(tmp_path / name, weights_only=True)
        with torch.device("meta"):  # no random initialisation of 138M parameters
            reference = torchvision.models.vgg16_bn(num_classes=7)
        reference.load_state_dict(state_dict, strict=True, assign=True)
        with torch.no_grad():
            theirs = reference.eval()(torch_input(batch, mean, std)).numpy()
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@pytest.mark.slow
def test_export_cli_both_formats(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    config = load_config_file(CONFIGS / "smoke.py")
    config.update(head="torchvision", image_size=32)
    info = DatasetInfo(tuple("abcdefg"), (110.0, 120.0, 100.0), (60.0,) * 3, 32, 1, 1)
    variables = random_variables(models.build_model(config, info), 32)
    _write_checkpoint(tmp_path / "run", config, variables, info)
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ours = np.asarray(jax.jit(models.build_model(config, info).apply)(variables, batch))
    for file_format, name in (("torchvision", "out.pth"), ("safetensors", "out.safetensors")):
        workdir, out = f"--workdir={tmp_path / 'run'}", str(tmp_path / name)
        result = run_cli("vgg_jax.export", workdir, f"--format={file_format}", out)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "torchvision layout" in result.stdout
        about = json.loads((tmp_path / f"{name}.json").read_text())
        assert about["class_names"] == list("abcdefg") and about["mean"] == [110.0, 120.0, 100.0]
        # A torchvision VGG module with vgg_tiny's stages loads it strictly ...
        reference = tiny_torchvision(spec.STAGES["vgg_tiny"], batch_norm=True, num_classes=7)
        if file_format == "safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(tmp_path / name)
        else:
            state_dict = torch.load(tmp_path / name, weights_only=True)
        reference.load_state_dict(state_dict, strict=True)
        with torch.no_grad():
            theirs = reference.eval()(torch_input(batch, info.mean, info.std)).numpy()
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
        # ... and it comes back with the normalisation recorded next to it.
        model, back = pretrained.from_torchvision(tmp_path / name)
        assert model.mean == info.mean
        jax.tree.map(np.testing.assert_array_equal, back, variables)
    result = run_cli("vgg_jax.export", f"--workdir={tmp_path / 'nothing'}", str(tmp_path / "x"))
    assert result.returncode != 0 and result.stderr.startswith("error: ")

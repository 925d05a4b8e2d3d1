"""experiments/gpu_queue.py: the GPU session's items, their keys, and when one is done."""

import json
import shutil
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))

import gpu_queue  # noqa: E402

ORDER = ["environment", "peers", "ours", "speed", "rest"]


def test_queue_follows_the_issue_order_and_every_training_item_is_a_valid_config():
    items = gpu_queue.build_queue("digest", small=False)
    groups = [item.group for item in items]
    assert groups == sorted(groups, key=ORDER.index)
    ids = [item.id for item in items]
    assert len(set(ids)) == len(ids)
    assert ids[:4] == ["environment", "airbench94", "torch_twin_fast", "ours_fast"]
    assert ids[-1] == "seed_vgg16_200"
    members = gpu_queue.pair_members("digest", small=False)
    assert gpu_queue.check_train_items(items + members) == {}


def test_a_typo_or_an_override_that_changes_nothing_is_caught_before_any_run():
    typo = gpu_queue.train_item(
        "typo", gpu_queue.FAST, ["--config.labl_smoothing=0.2"], 1, True, "d"
    )
    same = gpu_queue.train_item("same", gpu_queue.FAST, ["--config.nesterov=True"], 1, True, "d")
    bad = gpu_queue.train_item(
        "bad", gpu_queue.FAST, ["--config.label_smoothing=2.0"], 1, True, "d"
    )
    problems = gpu_queue.check_train_items([typo, same, bad])
    assert set(problems) == {"typo", "same", "bad"}
    assert "labl_smoothing" in problems["typo"]
    assert "already" in problems["same"]
    assert "label_smoothing" in problems["bad"]


def test_key_changes_with_what_the_result_depends_on_only():
    def item(overrides=(), data="d", small=False):
        queue = gpu_queue.build_queue(data, small)
        base = next(i for i in queue if i.id == "fast_ls02")
        return gpu_queue.train_item("fast_ls02", gpu_queue.FAST, list(overrides) or
                                    base.definition["overrides"], 90, False, data)  # fmt: skip

    assert item().key == item().key
    assert item(["--config.label_smoothing=0.3"]).key != item().key
    assert item(data="other").key != item().key
    small = {i.id: i.key for i in gpu_queue.build_queue("d", small=True)}
    full = {i.id: i.key for i in gpu_queue.build_queue("d", small=False)}
    assert not set(small.values()) & set(full.values())  # a rehearsal is never 'done'


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    for path in (*gpu_queue.STEP_FILES, "src/vgg_jax/train.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, tmp_path / path)
    monkeypatch.setattr(gpu_queue, "REPO", tmp_path)
    return tmp_path


def test_code_digest_follows_the_step_and_model_not_other_edits(repo_copy):
    before = gpu_queue.code_digest()
    train = repo_copy / "src/vgg_jax/train.py"
    text = train.read_text()
    train.write_text(text + "\n\ndef unrelated():\n    return 1\n")
    assert gpu_queue.code_digest() == before  # checkpointing, logging: no new speed rows
    train.write_text(text.replace("loss * count", "loss * count * 1"))
    assert gpu_queue.code_digest() != before  # the step changed
    train.write_text(text)
    models = repo_copy / "src/vgg_jax/models.py"
    models.write_text(models.read_text() + "\n# changed\n")
    assert gpu_queue.code_digest() != before
    train.write_text(text.replace("def train_step(", "def renamed_step("))
    with pytest.raises(ValueError, match="train_step"):
        gpu_queue.code_digest()


def test_done_means_same_id_same_key_and_status_done(tmp_path):
    item = next(i for i in gpu_queue.build_queue("d", small=False) if i.id == "fast_l2_1e3")
    session = tmp_path / "20261206_1200"
    session.mkdir()
    rows = [
        {"id": item.id, "key": item.key, "status": "stopped"},
        {"id": item.id, "key": "0" * 16, "status": "done"},
        {"id": "fast_ls02", "key": item.key, "status": "done"},
    ]
    (session / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_queue.done_in(gpu_queue.committed_results(tmp_path), item) is None
    with open(session / "results.jsonl", "a") as out:
        out.write(json.dumps({"id": item.id, "key": item.key, "status": "done"}) + "\n")
    done = gpu_queue.done_in(gpu_queue.committed_results(tmp_path), item)
    assert done["_file"].endswith("20261206_1200/results.jsonl")

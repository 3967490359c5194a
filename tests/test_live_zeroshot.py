"""Validation zero-shot during pretraining: logged every train.eval_every steps from the live
state, equal to the zero-shot job on a checkpoint of the same step, shown in the report."""

import json
import os

import pytest

from data_prep import build, synthetic
from configs import demo
from configs import report as report_config
from configs import zeroshot as zeroshot_config
from mama_jax.train import metrics_log, pretrain
from mama_jax.evaluate import during_training, report, zeroshot

EVAL_STEPS = (2, 4, 6)


def _config(dataset_dir):
    cfg = demo.get_config("test")
    cfg.data.dataset_dir = dataset_dir
    # Prompts untruncated (demo:test's 64 tokens cut the class sentences, every class then
    # scores the same): the scores differ per class and the comparison means something.
    cfg.data.max_length = 128
    # log_every 5: the evaluated steps 2 and 4 get a log line of their own.
    cfg.train.update(dict(eval_every=2, log_every=5, checkpoint_every=2, keep_checkpoints=3))
    return cfg


@pytest.fixture(scope="module")
def dataset_with_validation(tmp_path_factory):
    """tiny_dataset's recipe (which has no validation split) rebuilt with half of its train
    patients in a validation split."""
    root = tmp_path_factory.mktemp("with_validation")
    synthetic.generate(str(root / "raw"), patients=6, seed=1, image_size=(160, 128))
    build.build("embed", str(root / "raw"), str(root / "raw"), str(root / "first"), workers=1,
                long_side=128)
    with open(root / "first" / "splits.json") as f:
        split = json.load(f)
    train_ids = split["splits"]["train"]
    # The validation half holds cancer labels of one class only: AUC undefined, not logged.
    split["splits"].update(train=train_ids[0::2], validation=train_ids[1::2])
    with open(root / "splits.json", "w") as f:
        json.dump(split, f)
    build.build("embed", str(root / "raw"), str(root / "raw"), str(root / "out"), workers=1,
                long_side=128, splits_file=str(root / "splits.json"))
    return build.dataset_dir(str(root / "out"), "embed")


@pytest.fixture(scope="module")
def live_run(dataset_with_validation, tmp_path_factory):
    cfg = _config(dataset_with_validation)
    workdir = str(tmp_path_factory.mktemp("live_zeroshot"))
    with open(os.path.join(workdir, "config_pretrain.json"), "w") as f:
        f.write(cfg.to_json_best_effort())  # what main writes; the zero-shot job reads it
    during_training.pretrain(cfg, workdir)
    return workdir


def _job_scores(pretrain_workdir: str, step: int, tasks: tuple, workdir: str) -> dict:
    """The zero-shot job's bACC / AUC on the validation split for checkpoint `step`."""
    cfg = zeroshot_config.get_config()
    cfg.update(dict(pretrain_workdir=pretrain_workdir, split="validation", step=step,
                    bootstrap=0, tasks=tasks))
    result = zeroshot.run(cfg, workdir)
    assert result["step"] == step
    return {f"val_zs/{task}/{name}": entry["metrics"][key] for task, entry in result["tasks"].items()
            for name, key in during_training.METRICS.items()}


def test_logged_at_every_eval_step_and_equal_to_the_job(live_run, tmp_path):
    rows = metrics_log.read_metrics(live_run)
    evaluated = sorted(s for s, row in rows.items() if "val_zs/density/bacc" in row)
    assert evaluated == list(EVAL_STEPS)
    assert sorted(rows) == [2, 4, 5, 6]  # log_every 5, plus a line at every evaluated step
    for step in EVAL_STEPS:
        live = {k: v for k, v in rows[step].items() if k.startswith("val_zs/")}
        assert rows[step]["eval_s"] > 0 and "total" in rows[step]
        tasks = tuple(sorted({k.split("/")[1] for k in live}))
        assert tasks == ("birads", "cancer", "density")
        assert "val_zs/cancer/bacc" in live and "val_zs/cancer/auc" not in live
        job = _job_scores(live_run, step, tasks, str(tmp_path / f"zs{step}"))
        job = {k: v for k, v in job.items() if v == v}  # an undefined (NaN) metric is not logged
        assert set(live) == set(job)
        for key, value in job.items():
            assert live[key] == pytest.approx(value, abs=1e-6), (step, key)
    assert pretrain.per_step_losses(live_run).keys() == rows.keys()  # every line has the loss


def test_report_shows_the_validation_curves(live_run, tmp_path):
    cfg = report_config.get_config()
    cfg.pretrain_workdir = live_run
    result = report.run(cfg, str(tmp_path))
    assert result["val_zeroshot_curves"] == 1
    assert os.path.isfile(tmp_path / "report" / "val_zeroshot.png")
    text = (tmp_path / "report.md").read_text()
    assert "![validation zero-shot](report/val_zeroshot.png)" in text
    assert "(step 6)" in text and "density" in text


def test_a_dataset_without_validation_split_turns_it_off(tiny_dataset, monkeypatch, capsys):
    def no_split(dataset_dir, split):
        raise KeyError(f"{dataset_dir}: no split {split!r}; it has test, train")

    monkeypatch.setattr(during_training.pipeline, "open_split", no_split)
    assert during_training.ValidationZeroShot.open(_config(tiny_dataset), "unused") is None
    assert "validation zero-shot: off" in capsys.readouterr().out


def test_a_task_without_labels_is_skipped(dataset_with_validation, monkeypatch, capsys):
    real = during_training.extract.record_fields

    def no_birads(source, keys):
        fields = real(source, keys)
        fields["birads"] = fields["birads"] * 0 - 1
        return fields

    monkeypatch.setattr(during_training.extract, "record_fields", no_birads)
    live = during_training.ValidationZeroShot.open(_config(dataset_with_validation), "unused")
    assert live is not None and "birads" not in live.labels and "density" in live.labels
    assert "birads skipped" in capsys.readouterr().out


def test_report_without_validation_scores_says_not_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "total": 1.0}) + "\n")
    result = report.run(report_config.get_config(), str(tmp_path))
    assert result["val_zeroshot_curves"] == 0
    assert "Validation zero-shot during pretraining: not run" in (tmp_path / "report.md").read_text()

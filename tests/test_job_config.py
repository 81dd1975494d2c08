"""The job's config: a --gin_param is refused only when gin applied it to no call (its
scoping followed), and --gin_file names are looked up as documented."""

import os

import gin
import pytest

from trainer.job_config import (
    UsageError,
    check_params_used,
    resolve_gin_file,
    shipped_config_dir,
)


@gin.configurable("job_config_test_folder")
def folder(root=None, classes=None):
    return root, classes


@gin.configurable("job_config_test_unused")
def unused(root=None):
    return root


@gin.configurable("job_config_test_job")
def job(train_data=None, eval_data=None):
    return train_data, eval_data


def run_job(*bindings):
    """Parses the bindings and calls the job, whose splits call the folder in their scopes
    (as train.train_data=@train_split/image_folder does); returns gin's operative config."""
    gin.clear_config()
    gin.parse_config(
        [
            "job_config_test_job.train_data = @train_split/job_config_test_folder()",
            "job_config_test_job.eval_data = @outer/eval_split/job_config_test_folder()",
            *bindings,
        ]
    )
    results = job()
    operative = dict(gin.config._OPERATIVE_CONFIG)
    gin.clear_config()
    return results, operative


@pytest.fixture(autouse=True)
def clean_gin():
    yield
    gin.clear_config()


def test_an_unscoped_binding_is_read_in_every_scope_that_calls_it():
    binding = "job_config_test_folder.root = '/data'"
    (train, evaluation), operative = run_job(binding)
    assert train == evaluation == ("/data", None)  # gin applied it in both scopes
    check_params_used([binding], operative)  # so it is read: no error


@pytest.mark.parametrize(
    "binding",
    [
        "train_split/job_config_test_folder.root = '/train'",
        "outer/job_config_test_folder.root = '/outer'",  # a scope the call's scope starts with
        "outer/eval_split/job_config_test_folder.classes = (2, 4)",
    ],
)
def test_a_binding_scoped_to_a_scope_the_job_calls_in_is_read(binding):
    _, operative = run_job(binding)
    check_params_used([binding], operative)


@pytest.mark.parametrize(
    "binding, message",
    [
        (
            "test_split/job_config_test_folder.root = '/x'",
            "nothing in this job calls 'test_split/job_config_test_folder'; it is called in "
            "scope outer/eval_split, train_split",
        ),
        (  # a scope that the call's scope contains, but does not start with
            "eval_split/job_config_test_folder.root = '/x'",
            "is never read",
        ),
        (
            "job_config_test_unused.root = '/x'",
            "nothing in this job calls 'job_config_test_unused' (check",
        ),
    ],
)
def test_a_binding_gin_applied_to_no_call_is_refused(binding, message):
    _, operative = run_job(binding)
    with pytest.raises(UsageError, match="never read") as refused:
        check_params_used([binding], operative)
    assert message in str(refused.value)


def test_a_config_name_is_a_path_first_then_a_shipped_config(tmp_path, monkeypatch):
    shipped = shipped_config_dir()
    assert resolve_gin_file("sop") == os.path.join(shipped, "sop.gin")
    assert resolve_gin_file("sop.gin") == os.path.join(shipped, "sop.gin")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sop.gin").write_text("train.steps = 3\n")
    assert resolve_gin_file("sop.gin") == "sop.gin"  # a file here wins over the shipped one
    assert resolve_gin_file(str(tmp_path / "sop.gin")) == str(tmp_path / "sop.gin")
    with pytest.raises(UsageError, match="'nosuch' not found .*the shipped configs are base, "):
        resolve_gin_file("nosuch")


def test_a_moved_binding_says_where_it_went():
    import trainer.config  # noqa: F401  (registers the job's configurables)
    from trainer.job_config import MOVED, parse_config

    assert MOVED["train.learning_rate"] == "optimizer.learning_rate"
    for old, new in MOVED.items():
        gin.clear_config()
        with pytest.raises(UsageError, match=f"^{old} is now {new}: rename it in the config"):
            parse_config(["digits"], [f"{old} = None"])


def test_each_part_reads_its_own_configurable():
    import trainer.config  # noqa: F401
    from trainer.job_config import parse_config
    from trainer.model import batchnorm_settings
    from trainer.outputs.checkpoints import checkpoint_settings
    from trainer.outputs.export import export_settings
    from trainer.step.learner import optimizer_settings, precision_policy

    gin.clear_config()
    parse_config(
        ["digits"],
        [
            "optimizer.name = 'sgd'",
            "optimizer.learning_rate = 0.1",
            "optimizer.scale_learning_rate = True",
            "optimizer.reference_batch_size = 512",
            "checkpoints.keep = 7",
            "export.enabled = False",
            "precision.policy = 'mixed_bfloat16'",
            "batchnorm.synchronized = True",
        ],
    )
    optimizer = optimizer_settings()
    assert (optimizer.name, optimizer.learning_rate) == ("sgd", 0.1)
    assert optimizer.base_rate(global_batch_size=1024) == pytest.approx(0.2)  # 0.1 × 1024/512
    assert checkpoint_settings().keep == 7 and checkpoint_settings().asynchronous is True
    assert export_settings() is False
    assert precision_policy() == "mixed_bfloat16" and batchnorm_settings() is True

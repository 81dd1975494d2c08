"""Proxy losses with class centres sharded over the replicas (Partial FC): the block
form of the losses, the Keras classes, and training on logical CPUs and Horovod workers
against one device."""

import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import losses
from losses import proxies
from tests.cross_replica_case import mirrored
from tests.jobs import run_horovod_2, run_job, scalars
from tests.proxy_case import CLASSES, LOSSES, PROXY_JOB, train
from trainer.backends.replicas import Replicas

FUNCTIONS = {
    "proxy_nca": (losses.proxy_nca_loss, {"softmax_scale": 4.0}),
    "proxy_anchor": (losses.proxy_anchor_loss, {}),
    "arcface": (losses.arcface_loss, {"scale": 16.0}),
    "cosface": (losses.cosface_loss, {}),
    "subcenter_arcface": (losses.subcenter_arcface_loss, {"sub_centers": 2}),
}


class Rendezvous:
    """Sums and maxima over blocks computed by threads, one per block: each reducer call
    waits for every block's value (the same calls in the same order on all)."""

    def __init__(self, parties):
        self.barrier = threading.Barrier(parties, timeout=60)  # a failing block: no hang
        self.values, self.lock = [], threading.Lock()

    def reducer(self, combine):
        def reduce(value):
            with self.lock:
                self.values.append(value)
            self.barrier.wait()
            result = combine(tf.stack(self.values))
            self.barrier.wait()
            with self.lock:
                self.values.clear()
            self.barrier.wait()
            return result

        return reduce


def blocks_of(name, e, y, c, options, bounds, rows, kept=None):
    """(value, gradient to the embeddings, gradient to each block) from one thread per
    block, the sums over blocks done by the rendezvous."""
    meeting = Rendezvous(len(bounds))
    out = [None] * len(bounds)

    def work(i, first, end):
        block_c = tf.Variable(c[first * rows : end * rows])
        embeddings = tf.Variable(e)
        with tf.GradientTape() as tape:
            block = proxies.proxy_loss_block(
                name, embeddings, y, block_c, first, len(c) // rows, options,
                meeting.reducer(lambda v: tf.reduce_sum(v, 0)),
                meeting.reducer(lambda v: tf.reduce_max(v, 0)),
                None if kept is None else kept[first:end],
            )  # fmt: skip
        grad_e, grad_c = tape.gradient(block.surrogate, [embeddings, block_c])
        out[i] = (float(block.value), grad_e.numpy(), tf.convert_to_tensor(grad_c).numpy())

    threads = [threading.Thread(target=work, args=(i, *b)) for i, b in enumerate(bounds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = [o[0] for o in out]
    return values, sum(o[1] for o in out), np.concatenate([o[2] for o in out])


@pytest.mark.parametrize("name", FUNCTIONS)
def test_the_loss_over_three_blocks_equals_the_whole(name):
    function, settings = FUNCTIONS[name]
    options = proxies.checked_options(name, **settings)
    rows = proxies.rows_per_class(name, options)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, size=10)
    c = rng.normal(size=(8 * rows, 5)).astype(np.float32)  # class 7 has no example
    e = tf.Variable(rng.normal(size=(10, 5)).astype(np.float32))
    cv = tf.Variable(c)
    with tf.GradientTape() as tape:
        whole = function(e, y, cv, **settings)
    want_e, want_c = tape.gradient(whole, [e, cv])
    values, got_e, got_c = blocks_of(name, e.numpy(), y, c, options, [(0, 3), (3, 5), (5, 8)], rows)
    np.testing.assert_allclose(values, float(whole), rtol=1e-6)  # the same on every block
    np.testing.assert_allclose(got_e, want_e.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_c, tf.convert_to_tensor(want_c).numpy(), atol=1e-5)


def test_partial_fc_keeps_every_positive_and_draws_the_same_for_any_blocks():
    labels = tf.constant([3, 3, 17, 250])
    ids = tf.range(1000)
    kept = proxies.sampled_classes(ids, labels, 0.1, seed=5, step=7).numpy()
    assert kept[[3, 17, 250]].all()
    assert 0.07 < kept.mean() < 0.14, kept.mean()
    parts = [proxies.sampled_classes(tf.range(a, b), labels, 0.1, 5, 7) for a, b in
             ((0, 333), (333, 900), (900, 1000))]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate(parts), kept)
    other_step = proxies.sampled_classes(ids, labels, 0.1, seed=5, step=8).numpy()
    assert (other_step != kept).sum() > 50


def test_partial_fc_over_blocks_equals_one_block_with_the_same_draw():
    options = proxies.checked_options("arcface", scale=16.0)
    rng = np.random.default_rng(2)
    y = rng.integers(0, 12, size=9)
    c = rng.normal(size=(30, 4)).astype(np.float32)
    e = rng.normal(size=(9, 4)).astype(np.float32)
    kept = proxies.sampled_classes(tf.range(30), y, 0.3, seed=1, step=0)
    one = blocks_of("arcface", e, y, c, options, [(0, 30)], 1, kept)
    three = blocks_of("arcface", e, y, c, options, [(0, 11), (11, 12), (12, 30)], 1, kept)
    np.testing.assert_allclose(three[0], one[0][0], rtol=1e-6)
    np.testing.assert_allclose(three[1], one[1], atol=1e-5)
    np.testing.assert_allclose(three[2], one[2], atol=1e-5)
    unsampled = ~kept.numpy()
    assert unsampled.any() and not np.abs(one[2][unsampled]).any()  # no gradient there


def test_initial_centres_do_not_depend_on_the_blocks():
    whole = proxies.initial_centres(0, 9000, 2, 4, seed=1).numpy()
    parts = [proxies.initial_centres(a, b, 2, 4, seed=1).numpy() for a, b in
             ((0, 4095), (4095, 4097), (4097, 9000))]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_a_proxy_loss_class_trains_its_centres_in_plain_model_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = np.arange(64) % 4
    x[:, :4] += 3 * np.eye(4)[y]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8)])
    loss = losses.ArcFaceLoss(num_classes=4, scale=16.0)
    loss.attach(model)
    before = loss.centres.numpy().copy()
    initial = float(losses.arcface_loss(model(x), y, before, scale=16.0))
    assert float(loss(y, model(x))) == pytest.approx(initial, rel=1e-6)
    model.compile(keras.optimizers.Adam(0.05), loss=loss)
    model.fit(x, y, batch_size=16, epochs=5, verbose=0)
    assert np.abs(loss.centres.numpy() - before).max() > 0.01  # the centres trained
    assert float(loss(y, model(x))) < 0.5 * initial
    config = loss.get_config()
    assert (config["num_classes"], config["embedding_dim"], config["scale"]) == (4, 8, 16.0)


def test_proxy_loss_classes_name_bad_settings():
    with pytest.raises(ValueError, match="sample_rate must be in"):
        losses.ArcFaceLoss(sample_rate=0)
    with pytest.raises(ValueError, match="ProxyAnchorLoss takes every proxy"):
        losses.ProxyAnchorLoss(sample_rate=0.5)
    with pytest.raises(ValueError, match="arcface takes no option alpha"):
        losses.ArcFaceLoss(alpha=3)
    with pytest.raises(ValueError, match="has no centres yet"):
        losses.CosFaceLoss()(np.zeros(2), np.zeros((2, 3), np.float32))


def assert_same_training(got, want, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=rtol)
    for g, w in zip(got["weights"], want["weights"], strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    for name in ("centres", "m", "v"):
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_centres_sharded_over_replicas_train_as_one_device(loss_name):
    """Three steps of Adam: the losses, the model and the centres with their slots."""
    one = train(Replicas(), loss_name)
    assert one["centres"].shape[0] == CLASSES * (2 if "subcenter" in loss_name else 1)
    for count in (2, 3):  # 7 classes over 3 replicas: 3/2/2
        assert_same_training(train(mirrored(count), loss_name), one)


def test_the_one_device_step_is_the_loss_function_s_gradient():
    """SGD, one step: the update is -rate × the gradient of losses.arcface_loss."""
    from tests.cross_replica_case import build_model
    from tests.proxy_case import batches

    got = train(Replicas(), "arcface", optimizer="sgd", steps=1)
    model = build_model()
    centres = tf.Variable(proxies.initial_centres(0, CLASSES, 1, 8, seed=3))
    x, labels = batches(1)[0]
    with tf.GradientTape() as tape:
        value = losses.arcface_loss(model(x), labels, centres, scale=16.0)
    grads = tape.gradient(value, [*model.trainable_variables, centres])
    assert got["losses"][0] == pytest.approx(float(value), rel=1e-6)
    want = [
        w.numpy() - 0.05 * g.numpy()
        for w, g in zip(model.trainable_variables, grads[:-1], strict=True)
    ]
    for g, w in zip(got["weights"], want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)
    np.testing.assert_allclose(
        got["centres"], centres.numpy() - 0.05 * grads[-1].numpy(), atol=1e-6
    )


def test_horovod_workers_with_sharded_centres_train_as_one_device(tmp_path):
    """The trainer's step (4 losses) and GlobalMiningModel.fit, on 2 Horovod workers."""
    out = tmp_path / "horovod.npz"
    run_horovod_2("tests.horovod_proxy_worker", str(out))
    got = dict(np.load(out, allow_pickle=True))
    for name in ("arcface", "proxy_anchor", "subcenter_arcface", "arcface_partial_fc"):
        want = train(Replicas(), name)
        result = {k.split("/", 1)[1]: v for k, v in got.items() if k.startswith(name + "/")}
        weights = [result.pop(f"weight{i}") for i in range(len(want["weights"]))]
        assert_same_training({**result, "weights": weights}, want)
    # GlobalMiningModel.fit on the two workers, against one device.
    one, _, one_centres = fitted_arcface()
    for name in ("centres", "m", "v"):
        np.testing.assert_allclose(got[f"fit/{name}"], one_centres[name], rtol=1e-5, atol=1e-6)
    for i, w in enumerate(one.get_weights()):
        np.testing.assert_allclose(got[f"fit/weight{i}"], w, rtol=1e-5, atol=1e-6)


def test_a_job_resumed_on_more_replicas_reshards_its_centres(tmp_path):
    """2 replicas to step 6, then 4 from its checkpoint: the loss curve of 4 replicas
    from the start (the centres re-sharded 2 -> 4 with their Adam slots)."""
    resumed = tmp_path / "resumed"
    first = run_job(resumed, (*PROXY_JOB, "distribute.cpu_replicas=2", "train.stop_after_steps=6"))
    assert "2 shards, Partial FC sample rate 0.5" in first.stdout
    assert (resumed / "checkpoints" / "centres-6.index").exists()
    run_job(resumed, (*PROXY_JOB, "distribute.cpu_replicas=4"))
    straight = tmp_path / "straight"
    run_job(straight, (*PROXY_JOB, "distribute.cpu_replicas=4"))
    got, want = scalars(resumed, "train/loss"), scalars(straight, "train/loss")
    assert sorted(got) == sorted(want) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [want[s] for s in range(1, 13)],
                               rtol=1e-5)  # fmt: skip
    assert want[12] < want[1]
    # Only the kept checkpoints' centres stay (checkpoints.keep).
    kept = {p.name for p in (resumed / "checkpoints").glob("centres-*.index")}
    assert kept == {"centres-6.index", "centres-12.index"}


def test_a_checkpoint_of_other_centres_is_refused_by_name(tmp_path):
    workdir = tmp_path / "job"
    run_job(workdir, (*PROXY_JOB, "distribute.cpu_replicas=2", "train.stop_after_steps=6"))
    done = run_job(
        workdir,
        (*PROXY_JOB, "ArcFaceLoss.num_classes=30", "distribute.cpu_replicas=2"),
        check=False,
    )
    assert done.returncode == 2
    assert "holds centres of shape [20, " in done.stderr and "[30, " in done.stderr


def test_a_finished_job_exports_the_whole_centres_beside_the_model(tmp_path):
    workdir = tmp_path / "job"
    params = [p for p in PROXY_JOB if not p.startswith("export.enabled")]
    done = run_job(workdir, (*params, "distribute.cpu_replicas=3", "train.steps=4"))
    centres = np.load(workdir / "class_centres.npy")
    assert centres.shape == (20, 256) and np.isfinite(centres).all()
    assert "class_centres.npy" in done.stdout
    # The last checkpoint holds the same matrix.
    saved = tf.train.load_checkpoint(str(workdir / "checkpoints" / "centres-4"))
    np.testing.assert_array_equal(saved.get_tensor("centres"), centres)


def fitted_arcface(strategy=None, optimizer=lambda: keras.optimizers.Adam(0.05)):
    """GlobalMiningModel.fit with ArcFace over tests/fit_case.py's batches (8 classes)."""
    import contextlib

    from tests.fit_case import GLOBAL_BATCH, batches, embedding_net
    from trainer.fit import GlobalMiningModel

    x, y = batches()
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = GlobalMiningModel(embedding_net())
        model.compile(optimizer=optimizer(), loss=losses.ArcFaceLoss(num_classes=9, scale=16.0))
    history = model.fit(x, y, batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    return model, history, model.centres.gathered()


def test_global_mining_model_shards_the_centres_and_fits_as_one_device():
    from tests.fit_case import mirrored_strategy

    one, one_history, one_centres = fitted_arcface()
    assert one.centres.bounds == [(0, 9)]
    two, two_history, two_centres = fitted_arcface(mirrored_strategy(2))
    assert two.centres.bounds == [(0, 5), (5, 9)]
    np.testing.assert_allclose(two_history.history["loss"], one_history.history["loss"], rtol=1e-5)
    for a, b in zip(two.get_weights(), one.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for name in ("centres", "m", "v"):
        np.testing.assert_allclose(two_centres[name], one_centres[name], rtol=1e-5, atol=1e-6)
    assert np.abs(one_centres["centres"] - proxies.initial_centres(0, 9, 1, 8, 0)).max() > 0.01


def test_global_mining_model_names_what_a_proxy_loss_lacks():
    from trainer.fit import GlobalMiningModel

    model = GlobalMiningModel(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="needs its num_classes set"):
        model.compile(loss=losses.ArcFaceLoss())
    with pytest.raises(ValueError, match="Adam, AdamW or SGD without momentum; got RMSprop"):
        fitted_arcface(optimizer=lambda: keras.optimizers.RMSprop())


def test_the_job_with_sharded_centres_is_one_device_s_on_every_backend(tmp_path):
    """The same job (Partial FC included) on one device, 2 Horovod workers and 2
    MultiWorkerMirrored workers: the loss curve and the exported centres (gathered from
    the workers: Horovod's all-gather, MultiWorkerMirrored's padded sum)."""
    from tests.jobs import HOROVOD_2, ROOT

    multi_worker_2 = (f"{ROOT}/launch/multi_worker.sh", "local", "2")
    params = [p for p in PROXY_JOB if not p.startswith(("export.enabled", "distribute."))]
    runs = {
        "single": ((), ("distribute.strategy='single'",)),
        "horovod2": (HOROVOD_2, ("distribute.strategy='horovod'",)),
        "multi_worker2": (multi_worker_2, ()),
    }
    results = {}
    for name, (launcher, extra) in runs.items():
        run_job(tmp_path / name, (*params, *extra), launcher)
        loss = scalars(tmp_path / name, "train/loss")
        results[name] = (
            [loss[s] for s in sorted(loss)],
            np.load(tmp_path / name / "class_centres.npy"),
        )
    want_loss, want_centres = results.pop("single")
    for name, (loss, centres) in results.items():
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(centres, want_centres, rtol=1e-4, atol=1e-6, err_msg=name)


def test_the_centres_learn_at_their_own_rate(tmp_path):
    """Adam's first steps move each coordinate by about the rate: 100 × the rate moves
    the centres about 100 × as far; a rate multiplier of 0 is refused by name."""
    params = [p for p in PROXY_JOB if not p.startswith(("export.enabled", "distribute.",
                                                         "train.steps"))]  # fmt: skip
    params += [
        "distribute.strategy='single'",
        "train.steps=2",
        "learning_rate_schedule.warmup_steps=0",
    ]
    moved = {}
    for multiplier in (1, 100):
        workdir = tmp_path / f"x{multiplier}"
        run_job(workdir, (*params, f"optimizer.centre_learning_rate_multiplier={multiplier}"))
        start = proxies.initial_centres(0, 20, 1, 256, seed=0).numpy()
        moved[multiplier] = np.abs(np.load(workdir / "class_centres.npy") - start).mean()
    assert 50 < moved[100] / moved[1] < 150, moved
    done = run_job(tmp_path / "zero", (*params, "optimizer.centre_learning_rate_multiplier=0"),
                   check=False)  # fmt: skip
    assert done.returncode == 2
    assert "optimizer.centre_learning_rate_multiplier must be > 0, got 0" in done.stderr


def test_saved_shards_are_read_back_exactly_on_any_replica_count(tmp_path):
    """Trained on one device and saved; read back and saved again by 3 replicas, then
    read by 2: the same centres, Adam slots and step count, bit for bit."""
    from trainer.step.class_centres import ShardedCentres

    def centres_on(replicas):
        loss = LOSSES["subcenter_arcface"](seed=3)
        loss.num_classes = CLASSES
        return ShardedCentres(loss, replicas, CLASSES, 8, "adam", schedule=lambda _: 0.05)

    trained = centres_on(Replicas())
    rng = np.random.default_rng(0)
    for shard in trained.shards:  # stand-ins for trained values, different per entry
        for variable in (shard.centres, *shard.slots.values()):
            variable.assign(rng.normal(size=variable.shape).astype(np.float32))
        shard.iterations.assign(17)
    trained.save(str(tmp_path), step=5)
    want = trained.gathered()
    for step, replicas in ((5, mirrored(3)), (6, mirrored(2))):
        restored = centres_on(replicas)
        restored.restore(str(tmp_path), step=step)
        assert [s.iterations.numpy() for s in restored.shards] == [17] * replicas.size
        got = restored.gathered()
        for name in ("centres", "m", "v"):
            assert got[name].tobytes() == want[name].tobytes(), name
        restored.save(str(tmp_path), step=step + 1)


def test_horovod_workers_save_their_own_centres_and_any_worker_count_reads_them(tmp_path):
    """2 Horovod workers save their own rows (nothing gathered: the worker refuses it);
    4 workers read them back bit for bit and save again; the 4 workers' checkpoint holds
    the same whole matrices, read by one process."""
    from tests import horovod_centres_worker as case

    directory = str(tmp_path)
    run_horovod_2("tests.horovod_centres_worker", "save", directory, "5")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "centres-5.data-00000-of-00002", "centres-5.data-00001-of-00002", "centres-5.index"
    ]  # fmt: skip
    run_horovod_2("tests.horovod_centres_worker", "restore", directory, "5", workers=4)
    want = case.whole()
    rows = [dict(np.load(tmp_path / f"rows-{rank}.npz")) for rank in range(4)]
    assert [(int(r["first"]), int(r["end"])) for r in rows] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    for name in ("centres", "m", "v"):
        got = np.concatenate([r[name] for r in rows])
        assert got.tobytes() == want[name].tobytes(), name
    assert [int(r["iterations"]) for r in rows] == [case.ITERATIONS] * 4
    reader = tf.train.load_checkpoint(str(tmp_path / "centres-6"))
    for name in ("centres", "m", "v"):
        assert reader.get_tensor(name).tobytes() == want[name].tobytes(), name
    assert reader.get_tensor("iterations") == case.ITERATIONS
    assert not list(tmp_path.glob("*_temp"))  # the parts were merged and cleared

"""The global data order: the global batch at step s is the same for any number of processes,
bad records replaced in their slot included, and a run resumes with another process count."""

import numpy as np
import pytest
from test_data_sources import make_jsonl
from test_pipeline import config, take

from beta_clip_jax.data import pipeline
from beta_clip_jax.tokenizer import Tokenizer

GLOBAL_BATCH = 4
STEPS = 8  # 32 positions over 22 records: the stream crosses an epoch boundary


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("global_order"))
    path, _ = make_jsonl(root, n=22, bad={3: "missing_image", 17: "corrupt_image"})
    return path


def _iterators(path, processes, **overrides):
    return [
        pipeline.build_train_iterator(
            config("jsonl", path, **overrides),
            batch_size_per_process=GLOBAL_BATCH // processes,
            seed=5,
            process_index=i,
            process_count=processes,
            image_size=16,
            tokenizer=Tokenizer(),
        )
        for i in range(processes)
    ]


def _global_batches(iterators, steps):
    """Each step's process batches joined in process order, as the mesh assembles them."""
    per_process = [take(it, steps) for it in iterators]
    return [
        {k: np.concatenate([p[s][k] for p in per_process]) for k in per_process[0][s]}
        for s in range(steps)
    ]


def _assert_same(a, b):
    assert len(a) == len(b)
    for s, (x, y) in enumerate(zip(a, b, strict=True)):
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"step {s} {key}")


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_global_batches_do_not_depend_on_the_process_count(dataset, packed):
    overrides = {"pack_texts": True, "pack_group": 1} if packed else {}
    one = _global_batches(_iterators(dataset, 1, **overrides), STEPS)
    for processes in (2, 4):
        _assert_same(_global_batches(_iterators(dataset, processes, **overrides), STEPS), one)
    # The two bad records were met and replaced in their slots: every batch is full.
    assert all(len(b["image"]) == GLOBAL_BATCH for b in one)


def test_each_epoch_is_one_permutation_of_the_records(dataset):
    """Within an epoch the processes together read every usable record once (replacements of
    the two bad ones aside), each process its own rows of every global batch."""
    iterators = _iterators(dataset, 2)
    rows = []
    for it in iterators:
        for batch in take(it, 5):  # 20 of the first epoch's 22 positions
            rows += [tuple(r) for r in batch["caption"]]
    assert len(rows) == 20
    good = [r for r in rows if r]
    assert len(set(good)) >= 18  # distinct, except the two bad slots' replacements
    assert iterators[0].records_seen + iterators[1].records_seen >= 20


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (4, 2)])
def test_resume_with_another_process_count_continues_exactly(dataset, before, after):
    reference = _global_batches(_iterators(dataset, 1), STEPS)
    running = _iterators(dataset, before)
    _assert_same(_global_batches(running, 3), reference[:3])
    state = running[0].get_state()  # the data state holds no process
    resumed = _iterators(dataset, after)
    for it in resumed:
        it.set_state(state)
    _assert_same(_global_batches(resumed, STEPS - 3), reference[3:])


def test_a_global_batch_must_fit_the_data(dataset):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.build_train_iterator(
            config("jsonl", dataset),
            batch_size_per_process=8,
            seed=0,
            process_index=0,
            process_count=4,
            image_size=16,
            tokenizer=Tokenizer(),
        )


def _summed(iterators):
    totals = {}
    for it in iterators:
        for key, value in it.metrics().items():
            totals[key] = totals.get(key, 0) + value
    return totals


@pytest.mark.parametrize("after", [1, 2, 4])
def test_merged_state_resumes_with_counters_that_add_up(dataset, after):
    """The checkpoint's data state (merge_states of every process's) restored on any process
    count: the merged totals go on exactly as one uninterrupted process's; the running sum
    may count a bad record once per process that met it since the last merge."""
    reference = _iterators(dataset, 1)[0]
    take(reference, STEPS)
    running = _iterators(dataset, 2)
    _global_batches(running, 3)
    merged = pipeline.TrainIterator.merge_states([it.get_state() for it in running])
    assert merged["next_batch"] == 3
    assert merged["records_seen"] <= sum(it.records_seen for it in running)
    resumed = _iterators(dataset, after)
    for i, it in enumerate(resumed):
        it.set_shared_state(merged, process_index=i)
    assert _summed(resumed)["data/skipped_missing_image"] == merged["counts"][0]
    _global_batches(resumed, STEPS - 3)
    want, got = reference.metrics(), _summed(resumed)
    final = pipeline.TrainIterator.merge_states([it.get_state() for it in resumed])
    merged = _iterators(dataset, 1)[0]
    merged.set_shared_state(final, process_index=0)
    assert merged.metrics() == want
    for key, value in want.items():
        assert value <= got[key] <= after * value, key
    assert want["data/skipped_missing_image"] + want["data/skipped_corrupt_image"] == 2
    # Adopting the merge while running (what every checkpoint save does) makes the sum exact.
    for i, it in enumerate(resumed):
        it.adopt_merged(final, process_index=i)
    assert _summed(resumed) == want
    assert _global_batches(resumed, 1)[0]["image"].shape[0] == GLOBAL_BATCH  # reader kept


def test_merge_refuses_processes_at_different_batches(dataset):
    one, two = _iterators(dataset, 2)
    take(one, 2)
    take(two, 1)
    with pytest.raises(ValueError, match="different batches"):
        pipeline.TrainIterator.merge_states([one.get_state(), two.get_state()])

"""The toy-world datasets through the data registry, like real ones."""

from vlprompt.data import build_dataset, sample_few_shot, subsample_classes


def test_toy_objects_builds_from_the_registry_and_is_stable(tmp_path):
    first = build_dataset("toy_objects", str(tmp_path), n_train_per_class=2, n_val_per_class=1, n_test_per_class=1)
    again = build_dataset("toy_objects", str(tmp_path), n_train_per_class=2, n_val_per_class=1, n_test_per_class=1)
    assert first == again
    assert len(first.classnames) >= 20 and len(first.train) == 2 * len(first.classnames)
    assert first.template == "a photo of a {}."
    few = sample_few_shot(first, 1, seed=1, cache_dir=str(tmp_path / "cache"))
    base = subsample_classes(few, "base")
    assert len(base.classnames) == (len(first.classnames) + 1) // 2
    assert all(d.label < len(base.classnames) for d in base.train)

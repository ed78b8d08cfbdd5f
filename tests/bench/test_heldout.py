import numpy as np

from incontext.bench import heldout
from incontext.world import edits


def test_the_held_out_set_is_fixed_and_grows_by_appending():
    a = heldout.heldout_examples("recolor", 3)
    b = heldout.heldout_examples("recolor", 5)
    assert [ex.instruction for ex in a] == [ex.instruction for ex in b[:3]]
    assert all(np.array_equal(np.asarray(x.context), np.asarray(y.context)) for x, y in zip(a, b))


def test_sizes_mix_square_and_the_non_square_training_sizes():
    sizes = {ex.context.size for ex in heldout.heldout_examples("add", 4)}
    assert sizes == {(128, 128)} | {s for s in edits.TRAIN_SIZES if s[0] != s[1]}


def test_a_family_added_to_the_world_is_picked_up(monkeypatch):
    monkeypatch.setattr(edits, "FAMILIES", (*edits.FAMILIES, "sparkle"))
    assert "sparkle" in heldout.families()
    assert "sparkle" not in heldout.basic_families()
    assert "sparkle" not in heldout.drift_families()  # the multi-turn sequences stay as measured


def test_the_basic_families_are_the_issue_2_set_and_a_subset_of_all():
    assert heldout.basic_families() == ("recolor", "remove", "add", "move", "background", "grayscale")
    assert set(heldout.basic_families()) < set(heldout.families())
    assert set(heldout.heldout_set(1, only=heldout.basic_families())) == set(heldout.basic_families())


def test_each_turn_edits_the_previous_result():
    (sequence,) = heldout.heldout_sequences(1, 4)
    assert len(sequence) == 4
    assert all(ex.family in heldout.drift_families() for ex in sequence)
    for before, after in zip(sequence, sequence[1:]):
        assert after.scene == before.target_scene
        assert np.array_equal(np.asarray(after.context), np.asarray(before.target))

"""lowvram.lesson: the lesson's script, its real line numbers, and train() beside it."""

import inspect

from lowvram.lesson import LESSON_SCRIPT, lesson_line, parts, side_by_side


def test_the_lessons_table_cites_other_lines_than_its_script_has():
    # the lesson's 25.4 table says 19, 38, 45, 47, 50 and 57; its own script has these
    assert [lesson_line(t) for t in ("Accelerator(", "accelerator.prepare(",
                                     "accelerator.accumulate(", "accelerator.backward(",
                                     "clip_grad_norm_", "accelerate launch")] == [
        17, 38, 50, 54, 57, 72]
    assert LESSON_SCRIPT.splitlines()[0] == "import torch"


def test_parts_split_at_numbered_comments():
    found = parts("x = 0\n# 1. one\na = 1\n  # 2. two\nb = 2\n", first_line=10)
    assert found == {1: [(11, "# 1. one"), (12, "a = 1")], 2: [(13, "  # 2. two"), (14, "b = 2")]}


def test_train_has_the_lessons_six_parts_in_order():
    from lowvram.train import train

    ours = parts(inspect.getsource(train))
    assert list(ours) == [1, 2, 3, 4, 5, 6]
    assert list(parts(LESSON_SCRIPT))[:6] == [1, 2, 3, 4, 5, 6]
    text = side_by_side(train)
    assert text.count("--- the lesson's train_accelerate.py") == 6
    lines, first = inspect.getsourcelines(train)
    prepare = first + next(i for i, line in enumerate(lines) if "accelerator.prepare(" in line)
    assert f"{prepare:>4}  " in text  # our lines carry their numbers in lowvram/train.py
    assert "  38  model, optimizer, train_dataloader" in text


def test_script_diff_shows_the_corrected_clipping(tmp_path):
    from lowvram.lesson import script_diff

    fixed = tmp_path / "fixed.py"
    fixed.write_text(LESSON_SCRIPT.replace(
        "            accelerator.clip_grad_norm_(model.parameters(), 1.0)",
        "            if accelerator.sync_gradients:\n"
        "                accelerator.clip_grad_norm_(model.parameters(), 1.0)"))
    assert script_diff(fixed, [6]).splitlines() == [
        "@@ -12,0 +13 @@", "+if accelerator.sync_gradients:"]  # the clip line itself is equal
    assert script_diff(fixed, [1, 2, 3, 4, 5]) == ""  # the same parts
    import pytest

    with pytest.raises(ValueError, match="part 8 is not in both"):
        script_diff(fixed, [8])

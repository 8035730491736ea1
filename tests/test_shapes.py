import random

import pytest

from chatapp.demo import shapes


def test_scenes_follow_the_rules(rng):
    for _ in range(300):
        scene = shapes.random_scene(rng)
        assert 1 <= len(scene.shapes) <= 3
        combos = [(s.kind, s.color) for s in scene.shapes]
        assert len(set(combos)) == len(combos)
        for a in scene.shapes:
            for b in scene.shapes:
                if a is not b:
                    assert (a.x - b.x) ** 2 + (a.y - b.y) ** 2 > (a.r + b.r) ** 2  # no overlap
        img = shapes.render(scene)
        assert img.size == (64, 64) and img.mode == "RGB"


def test_same_seed_same_data():
    a = [shapes.random_example(random.Random(7)) for _ in range(1)]
    b = [shapes.random_example(random.Random(7)) for _ in range(1)]
    assert a == b


@pytest.mark.parametrize("qtype", shapes.QUESTION_TYPES)
def test_every_reference_answer_is_correct_and_its_style_is_recoverable(qtype, rng):
    for _ in range(200):
        for style in shapes.STYLES:
            ex = shapes.random_example(rng, qtype, style)
            assert shapes.answer_style(ex.answer) == style, ex.answer
            assert shapes.grade(ex, ex.answer), (ex.question, ex.answer)


def test_grader_rejects_wrong_content():
    scene = shapes.Scene((shapes.Shape("circle", "red", 20, 20, 8), shapes.Shape("square", "blue", 45, 45, 8)))
    assert not shapes.grade(shapes.Example("color", "", "", "terse", scene, ("circle",)), "Green.")
    assert not shapes.grade(shapes.Example("color", "", "", "terse", scene, ("circle",)), "Red and blue.")
    assert shapes.grade(shapes.Example("color", "", "", "terse", scene, ("circle",)), "The circle is red.")
    assert not shapes.grade(shapes.Example("count", "", "", "terse", scene), "Three.")
    assert shapes.grade(shapes.Example("count", "", "", "terse", scene), "There are two shapes.")
    assert not shapes.grade(shapes.Example("exists", "", "", "terse", scene, ("blue", "circle")), "Yes.")
    assert shapes.grade(shapes.Example("exists", "", "", "terse", scene, ("blue", "circle")), "No.")
    describe = shapes.Example("describe", "", "", "terse", scene)
    assert shapes.grade(describe, "A red circle and a blue square.")
    assert not shapes.grade(describe, "A blue circle and a red square.")
    assert not shapes.grade(describe, "A red circle.")
    assert not shapes.grade(shapes.Example("shapes", "", "", "terse", scene), "A circle and a triangle.")
    assert not shapes.grade(shapes.Example("shapes", "", "", "terse", scene), "Two circles and a square.")
    assert shapes.grade(shapes.Example("shapes", "", "", "terse", scene), "I see a circle and a square.")

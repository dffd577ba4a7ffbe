import pytest

from bna_export.errors import BadInputError
from bna_export.settings import Settings, with_overrides


def test_overrides_take_the_type_of_the_field():
    s = with_overrides(
        Settings(),
        [
            "reverse.steps=50",
            "detect.mad_threshold=3",
            "trigger_type=patch",
            "fit.target_triggered=false",
            "fit.trigger_scales=1,2",
            "detect.normalise=none",
        ],
    )
    assert s.reverse.steps == 50 and s.detect.mad_threshold == 3.0
    assert s.trigger_type == "patch" and s.fit.target_triggered is False
    assert s.fit.trigger_scales == (1.0, 2.0) and s.detect.normalise == "none"
    assert Settings.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    "item, message",
    [
        ("reverse.nope=1", "SECTION.FIELD=VALUE"),
        ("reverse=3", "SECTION.FIELD=VALUE"),
        ("steps", "SECTION.FIELD=VALUE"),
        ("a.b.c=1", "SECTION.FIELD=VALUE"),
        ("reverse.steps=x", "expected int"),
        ("trigger_type=foo", "expected patch or perturbation or blend or warp or both"),
        ("fit.target_triggered=maybe", "expected bool"),
    ],
)
def test_bad_overrides_say_what_was_expected(item, message):
    with pytest.raises(BadInputError, match=message):
        with_overrides(Settings(), [item])

"""A model's sampling settings changed by sampler and name, as a fine-tuning records them."""

import pytest

from mmfusion.errors import ConfigError
from mmfusion.generation.settings import SampleConfig


def test_changes_by_sampler_and_name_leave_the_rest():
    base = SampleConfig()
    changed = base.changed({"diffusion": {"cfg_scale": 7.5, "steps": 9}, "caption": {"method": "beam"}})
    assert (changed.diffusion.cfg_scale, changed.diffusion.steps, changed.caption.method) == (7.5, 9, "beam")
    assert changed.diffusion.sampler == base.diffusion.sampler and changed.tokens == base.tokens
    assert base.changed(None) == base == base.changed({})


@pytest.mark.parametrize(
    ("changes", "key"), [({"images": {"cfg_scale": 2.0}}, "images"), ({"diffusion": {"cfg": 2.0}}, "cfg")]
)
def test_an_unknown_sampler_or_setting_is_refused_by_name(changes, key):
    with pytest.raises(ConfigError, match=f"^{key}: not a"):
        SampleConfig().changed(changes)

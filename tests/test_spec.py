"""ConnectorSpec: constructor validation, presets and the questions it answers."""

from __future__ import annotations

import dataclasses

import pytest

from dc_kernels import ConnectorSpec

CLIP_DCI = ConnectorSpec.preset("clip", "dci")
CLIP_SCI = ConnectorSpec.preset("clip", "sci")
CLIP_STI = ConnectorSpec.preset("clip", "sti")
SIGLIP_DCI = ConnectorSpec.preset("siglip", "dci")
SIGLIP_SCI = ConnectorSpec.preset("siglip", "sci")
SIGLIP_STI = ConnectorSpec.preset("siglip", "sti")
CUSTOM3 = ConnectorSpec("dci", final_layer=23, groups=((0, 8), (8, 16), (16, 24)), drop_cls=True)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(connector_type="dcx", final_layer=3, groups=((0, 2),)), r"connector_type must be one of"),
    (dict(connector_type="DCI", final_layer=3, groups=((0, 2),)), r"connector_type must be one of"),
    (dict(connector_type=None, final_layer=3, groups=((0, 2),)), r"connector_type must be one of"),
    (dict(connector_type="dci", final_layer=-1, groups=((0, 2),)),
     r"final_layer must be a non-negative hidden-state index, got -1"),
    (dict(connector_type="dci", final_layer=3.0, groups=((0, 2),)), r"final_layer.*3\.0"),
    (dict(connector_type="dci", final_layer="3", groups=((0, 2),)), r"final_layer"),
    (dict(connector_type="dci", final_layer=True, groups=((0, 2),)), r"final_layer"),
    (dict(connector_type="dci", final_layer=None, groups=((0, 2),)), r"final_layer"),
    (dict(connector_type="dci", final_layer=3, groups=()), r"groups must name at least one"),
    (dict(connector_type="dci", final_layer=3, groups=[]), r"groups must name at least one"),
    (dict(connector_type="dci", final_layer=3, groups=5), r"groups must be a sequence of"),
    (dict(connector_type="dci", final_layer=3, groups=(0, 2)), r"groups must be a sequence of"),
    (dict(connector_type="dci", final_layer=3, groups=((0, 2), (5, 3))),
     r"groups\[1\] = \(5, 3\): reversed range"),
    (dict(connector_type="dci", final_layer=3, groups=((2, 2),)),
     r"groups\[0\] = \(2, 2\): empty range"),
    (dict(connector_type="dci", final_layer=3, groups=((-1, 2),)),
     r"groups\[0\] = \(-1, 2\): start must be >= 0"),
    (dict(connector_type="dci", final_layer=3, groups=((0, 2, 4),)),
     r"groups\[0\] must be a pair of ints"),
    (dict(connector_type="dci", final_layer=3, groups=((0, 2), (1,))),
     r"groups\[1\] must be a pair of ints"),
    (dict(connector_type="dci", final_layer=3, groups=((0.0, 2),)),
     r"groups\[0\] must be a pair of ints"),
    (dict(connector_type="dci", final_layer=3, groups=((False, True),)),
     r"groups\[0\] must be a pair of ints"),
    (dict(connector_type="sci", final_layer=3, groups=((7, 8), (0, 2))),
     r"groups\[1\] = \(0, 2\): an 'sci' spec takes single layers"),
    (dict(connector_type="sti", final_layer=3, groups=((0, 2),), pool_size=0),
     r"pool_size must be an int >= 1, got 0"),
    (dict(connector_type="sti", final_layer=3, groups=((0, 2),), pool_size=-8),
     r"pool_size must be an int >= 1"),
    (dict(connector_type="sti", final_layer=3, groups=((0, 2),), pool_size=2.0),
     r"pool_size must be an int >= 1"),
    (dict(connector_type="dci", final_layer=3, groups=((0, 2),), drop_cls=1),
     r"drop_cls must be a bool"),
    (dict(connector_type="dci", final_layer=23, groups=((0, 12), (12, 24)), num_hidden_states=23),
     r"num_hidden_states=23 is too small.*up to 23"),
    (dict(connector_type="dci", final_layer=3, groups=((0, 12),), num_hidden_states=11),
     r"num_hidden_states=11 is too small.*up to 11"),
    (dict(connector_type="dci", final_layer=3, groups=((0, 2),), num_hidden_states=4.0),
     r"num_hidden_states"),
])
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConnectorSpec(**kwargs)


def test_constructor_accepts_boundaries():
    # the smallest legal values of everything
    s = ConnectorSpec("sti", final_layer=0, groups=((0, 1),), pool_size=1, num_hidden_states=1)
    assert s.min_hidden_states == 1 and s.required_hidden_states == 1
    # num_hidden_states exactly the minimum, and larger
    assert ConnectorSpec("dci", 3, ((0, 5),), num_hidden_states=5).num_hidden_states == 5
    assert ConnectorSpec("dci", 3, ((0, 5),), num_hidden_states=40).required_hidden_states == 40


@pytest.mark.parametrize("encoder, connector, match", [
    ("vit", "dci", r"encoder must be one of"),
    ("CLIP", "dci", r"encoder must be one of"),
    ("clip", "mean", r"connector_type must be one of"),
    ("siglip", "", r"connector_type must be one of"),
])
def test_preset_rejects(encoder, connector, match):
    with pytest.raises(ValueError, match=match):
        ConnectorSpec.preset(encoder, connector)


# --------------------------------------------------------------------------- answers
def test_min_and_required_hidden_states():
    assert CLIP_DCI.min_hidden_states == 24  # reads up to index 23 (index 24 unused)
    assert CLIP_DCI.required_hidden_states == 25
    assert CLIP_SCI.min_hidden_states == 24 and CLIP_STI.required_hidden_states == 25
    assert SIGLIP_DCI.min_hidden_states == 27 and SIGLIP_DCI.required_hidden_states == 27
    assert SIGLIP_STI.min_hidden_states == 27
    assert CUSTOM3.min_hidden_states == 24 and CUSTOM3.required_hidden_states == 24
    s = ConnectorSpec("dci", final_layer=2, groups=((5, 9),))
    assert s.min_hidden_states == 9 and s.required_hidden_states == 9
    s = ConnectorSpec("dci", final_layer=11, groups=((0, 3),))
    assert s.min_hidden_states == 12


def test_used_layers():
    assert CLIP_DCI.used_layers == tuple(range(24))
    assert SIGLIP_DCI.used_layers == tuple(range(27))
    assert CLIP_SCI.used_layers == (7, 15, 23) == CLIP_STI.used_layers
    assert SIGLIP_SCI.used_layers == (7, 15, 26) == SIGLIP_STI.used_layers
    overlapping = ConnectorSpec("dci", final_layer=9, groups=((4, 7), (0, 5), (5, 6)))
    assert overlapping.used_layers == (0, 1, 2, 3, 4, 5, 6, 9)


def test_num_groups_token_offset_and_kept_tokens():
    assert CLIP_DCI.num_groups == 2 and CUSTOM3.num_groups == 3
    assert CLIP_DCI.token_offset == 1 and SIGLIP_DCI.token_offset == 0
    assert CLIP_DCI.tokens_kept(577) == 576 and SIGLIP_DCI.tokens_kept(729) == 729
    assert CLIP_STI.pooled_tokens(577) == 72 and SIGLIP_STI.pooled_tokens(729) == 91
    assert CLIP_STI.pooled_tokens(8) == 0  # 7 kept tokens < one window


def test_out_channels():
    for spec in (CLIP_DCI, CLIP_SCI):
        assert spec.out_channels(1024) == 3072
    for spec in (SIGLIP_DCI, SIGLIP_SCI):
        assert spec.out_channels(1152) == 3456
    assert CLIP_STI.out_channels(1024) == 1024
    assert SIGLIP_STI.out_channels(1152) == 1152
    assert CUSTOM3.out_channels(1024) == 4096
    four = ConnectorSpec("sci", final_layer=5, groups=((1, 2), (2, 3), (3, 4), (4, 5)))
    assert four.out_channels(10) == 50
    sti3 = ConnectorSpec("sti", final_layer=5, groups=((0, 2), (2, 4), (4, 6)))
    assert sti3.out_channels(10) == 10


def test_out_tokens():
    assert CLIP_DCI.out_tokens(577) == 576
    assert CLIP_SCI.out_tokens(577) == 576
    assert CLIP_STI.out_tokens(577) == 576 + 72 + 72 == 720
    assert SIGLIP_DCI.out_tokens(729) == 729
    assert SIGLIP_SCI.out_tokens(729) == 729
    assert SIGLIP_STI.out_tokens(729) == 729 + 91 + 91 == 911
    assert CLIP_STI.out_tokens(17) == 16 + 2 + 2
    assert CLIP_STI.out_tokens(8) == 7  # no whole window: base only
    assert CLIP_DCI.out_tokens(1) == 0  # only CLS
    assert SIGLIP_STI.out_tokens(0) == 0
    sti3 = ConnectorSpec("sti", final_layer=5, groups=((0, 2), (2, 4), (4, 6)), pool_size=3)
    assert sti3.out_tokens(10) == 10 + 3 * 3
    with pytest.raises(ValueError, match=r"num_tokens=0 leaves no token"):
        CLIP_DCI.out_tokens(0)


def test_check_num_hidden_states():
    CLIP_DCI.check_num_hidden_states(25)
    for n in (24, 26, 0):
        with pytest.raises(ValueError, match=rf"exactly 25 hidden states.*got {n}\b"):
            CLIP_DCI.check_num_hidden_states(n)
    with pytest.raises(ValueError, match=r"exactly 27 hidden states.*got 26"):
        SIGLIP_STI.check_num_hidden_states(26)
    CUSTOM3.check_num_hidden_states(24)
    CUSTOM3.check_num_hidden_states(30)  # no fixed count: longer tuples are fine
    with pytest.raises(ValueError, match=r"at least 24 hidden states, got 23"):
        CUSTOM3.check_num_hidden_states(23)


# --------------------------------------------------------------------------- value semantics
def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CLIP_DCI.final_layer = 22
    with pytest.raises(dataclasses.FrozenInstanceError):
        CLIP_DCI.groups = ((0, 1),)


def test_spec_is_hashable_and_compares_by_value():
    again = ConnectorSpec.preset("clip", "dci")
    assert again == CLIP_DCI and hash(again) == hash(CLIP_DCI)
    # groups given as lists are normalised to tuples of tuples (so the spec stays hashable)
    from_lists = ConnectorSpec("dci", 23, [[0, 12], [12, 24]], drop_cls=True,
                               num_hidden_states=25)
    assert from_lists.groups == ((0, 12), (12, 24))
    assert isinstance(from_lists.groups, tuple)
    assert all(isinstance(g, tuple) for g in from_lists.groups)
    assert from_lists == CLIP_DCI and hash(from_lists) == hash(CLIP_DCI)
    table = {CLIP_DCI: "a", SIGLIP_DCI: "b", CLIP_STI: "c"}
    assert table[ConnectorSpec.preset("siglip", "dci")] == "b"
    assert len({CLIP_DCI, again, from_lists, CLIP_SCI, CLIP_STI}) == 3
    assert CLIP_SCI != SIGLIP_SCI and CLIP_SCI != CLIP_STI
    assert ConnectorSpec("dci", 3, ((0, 2),)) != ConnectorSpec("dci", 3, ((0, 2),),
                                                               num_hidden_states=4)


def test_integer_scalars_are_accepted_and_normalised():
    # e.g. indices read from a numpy array or a config file
    import numpy as np
    spec = ConnectorSpec("dci", final_layer=np.int64(5), groups=((np.int32(0), 3), (3, 6)),
                         pool_size=np.int16(4), num_hidden_states=np.int64(7))
    assert spec == ConnectorSpec("dci", 5, ((0, 3), (3, 6)), pool_size=4, num_hidden_states=7)
    assert type(spec.final_layer) is int and type(spec.groups[0][0]) is int
    with pytest.raises(ValueError, match="final_layer"):
        ConnectorSpec("dci", final_layer=np.float64(5.0), groups=((0, 3),))

import json

import numpy as np
import pytest

from avseg.data.palette import (
    AVSS_CLASSES,
    NUM_AVSS_CLASSES,
    decode_colour_mask,
    encode_colour_mask,
    label2idx_json,
    voc_colormap,
)


def test_class_list_matches_official_order():
    assert NUM_AVSS_CLASSES == 71
    assert AVSS_CLASSES[0] == "background"
    assert AVSS_CLASSES[1] == "accordion" and AVSS_CLASSES[-1] == "woman"
    assert len(set(AVSS_CLASSES)) == 71
    keys = list(json.loads(json.dumps(label2idx_json())).keys())
    assert keys == list(AVSS_CLASSES)


@pytest.mark.parametrize(
    "name, rgb",
    [
        ("background", (0, 0, 0)),
        ("accordion", (128, 0, 0)),
        ("airplane", (0, 128, 0)),
        ("axe", (128, 128, 0)),
        ("baby", (0, 0, 128)),
        ("woman", (32, 128, 128)),
    ],
)
def test_voc_colours_of_documented_examples(name, rgb):
    assert tuple(voc_colormap(71)[AVSS_CLASSES.index(name)]) == rgb


def test_all_71_classes_round_trip_and_are_distinct():
    cmap = voc_colormap(71)
    assert len({tuple(c) for c in cmap}) == 71
    index = np.arange(71).reshape(1, 71).repeat(3, axis=0)
    decoded, unknown = decode_colour_mask(encode_colour_mask(index))
    assert not unknown.any()
    np.testing.assert_array_equal(decoded, index)


def test_unknown_colour_is_reported_not_mapped_silently():
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (1, 2, 3)
    _, unknown = decode_colour_mask(rgb)
    assert unknown[0, 0] and unknown.sum() == 1

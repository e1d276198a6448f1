"""naming.py: the one place layer names and metric keys are written and parsed."""

import pytest

from fairseq_moe_plugin import naming


def test_layer_names_both_ways():
    assert naming.module_name("encoder", 3) == "encoder.layers.3"
    assert naming.short_name("encoder.layers.3") == "enc3"
    assert naming.short_name("decoder.layers.11") == "dec11"
    assert naming.short_name("dec11") == "dec11"
    assert naming.parse_layer("enc0") == naming.parse_layer("encoder.layers.0") == ("encoder", 0)
    assert naming.layer_side("decoder.layers.1") == naming.layer_side("dec1") == "decoder"
    names = ["dec1", "encoder.layers.3", "enc1", "decoder.layers.0"]
    assert sorted(names, key=naming.layer_order) == [
        "enc1",
        "encoder.layers.3",
        "decoder.layers.0",
        "dec1",
    ]


def test_logging_keys_and_metric_names_round_trip():
    assert naming.count_key("encoder.layers.1", 3) == "moe_count:enc1:3"
    assert naming.parse_count_key("moe_count:enc1:3") == ("enc1", 3)
    assert naming.parse_count_key("moe_dropped") is None
    assert naming.layer_stat_key("decoder.layers.1", "dropped") == "moe_layer:dec1:dropped"
    assert naming.layer_metric("dec1", "cv") == "moe_dec1_cv"
    assert naming.load_metric("encoder.layers.1", 12) == "moe_enc1_load_e12"
    assert naming.parse_load_metric("moe_enc1_load_e12") == ("enc1", 12)
    assert naming.parse_load_metric("moe_enc1_max_load") is None
    assert naming.is_internal_key("moe_count:enc1:3") and naming.is_internal_key("moe_layer:dec1:z")
    assert naming.is_routing_metric("moe_enc1_cv") and not naming.is_routing_metric("loss")
    assert not naming.is_routing_metric("moe_count:enc1:3")


@pytest.mark.parametrize("name", ["encoder.layer.1", "enc", "mid1", "encoder.layers.x", ""])
def test_bad_layer_names_are_refused(name):
    with pytest.raises(ValueError, match="is not an MoE layer name"):
        naming.short_name(name)


def test_bad_side_is_refused():
    with pytest.raises(ValueError, match="layer side must be one of"):
        naming.module_name("middle", 1)

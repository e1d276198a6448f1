"""The validation table (models/config_rules.py): its rows name real flags, the routing
methods' own flags carry the config's defaults, and a method's flag set without the method is
warned about."""

import logging
from argparse import Namespace
from dataclasses import fields

import pytest

from fairseq_moe_plugin.models.config_rules import RULES, validate_moe_args
from fairseq_moe_plugin.models.moe_config import MoEConfig
from fairseq_moe_plugin.modules.routing import ROUTING_METHODS

# fairseq's own options that rules read beside MoEConfig's
FAIRSEQ_FLAGS = {
    "encoder_moe_freq", "decoder_moe_freq", "encoder_layers", "decoder_layers", "ddp_backend",
    "fp16", "bf16", "encoder_layerdrop", "decoder_layerdrop", "store_ema",
    "write_checkpoints_asynchronously",
}  # fmt: skip


def test_every_rule_names_flags_that_exist():
    known = {f.name for f in fields(MoEConfig)} | FAIRSEQ_FLAGS
    for rule in RULES:
        assert rule.flags and set(rule.flags) <= known, rule.flags
        assert (rule.check is None) != (rule.broken is None), rule.flags


def test_a_routing_method_declares_its_flags_with_the_config_defaults():
    """Each method's ``flags`` (the options only it reads) carry MoEConfig's defaults, so the
    table's warning for a flag set while no method in use reads it starts from the right value."""
    defaults = MoEConfig()
    for method in ROUTING_METHODS.values():
        for name, default in method.flags.items():
            assert getattr(defaults, name) == default, (method.name, name)


def test_a_method_flag_set_without_its_method_is_warned_about(caplog):
    args = Namespace(**vars(MoEConfig(moe_expert_count=4, moe_expert_capacity_factor=1.0)),
                     arch="moe_transformer_tiny", encoder_layers=2, decoder_layers=2)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        validate_moe_args(args)
    assert "--moe-expert-capacity-factor has no effect: only expert-choice routing reads it" in (
        caplog.text
    )
    caplog.clear()
    args.moe_routing, args.moe_decoder_routing = "expert_choice", "topk"
    with caplog.at_level(logging.WARNING):
        validate_moe_args(args)
    assert "--moe-expert-capacity-factor has no effect" not in caplog.text


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("moe_routing", "hash", r"^toy: routing \(--moe-routing\) must be one of .*got 'hash'"),
        ("moe_decoder_routing", "hash", r"^toy: routing \(--moe-decoder-routing\) must be one"),
        ("moe_expert_type", "conv", r"^toy: unknown --moe-expert-type 'conv'; expected one of"),
        ("moe_expert_placement", "side", r"^toy: unknown --moe-expert-placement 'side'"),
    ],
)
def test_an_unknown_registered_name_is_refused_naming_the_flag(field, value, message):
    args = Namespace(**vars(MoEConfig(moe_expert_count=4)), arch="toy", encoder_layers=2,
                     decoder_layers=2)  # fmt: skip
    setattr(args, field, value)
    with pytest.raises(ValueError, match=message):
        validate_moe_args(args)

"""A stand-in task and parsed arguments for building moe_roberta models without data."""

import torch
from conftest import PLUGIN_DIR
from fairseq.data import Dictionary


class FakeTask:
    """What RoBERTa's build_model needs from a task."""

    def __init__(self, labels=("0", "1", "2")):
        self.source_dictionary = Dictionary()
        for i in range(40):
            self.source_dictionary.add_symbol(f"w{i}")
        self.label_dictionary = Dictionary()
        for label in labels:
            self.label_dictionary.add_symbol(label)

    def max_positions(self):
        return 64


def roberta_args(*extra, arch="moe_roberta_tiny"):
    from fairseq import options

    parser = options.get_training_parser()
    argv = ["/unused", "--user-dir", str(PLUGIN_DIR), "--task", "sentence_prediction",
            "--criterion", "sentence_prediction",
            "--arch", arch, "--num-classes", "3", "--dropout", "0", "--attention-dropout", "0",
            "--max-positions", "64", *map(str, extra)]  # fmt: skip
    return options.parse_args_and_arch(parser, input_args=argv)


def tokens():
    torch.manual_seed(0)
    tokens = torch.randint(4, 44, (3, 9))
    tokens[:, 0] = 0  # <s>
    tokens[0, 6:] = 1  # padding (RoBERTa pads on the right)
    return tokens

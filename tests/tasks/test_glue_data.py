"""The GLUE readers: each task's real layout, and errors naming file, line and expectation."""

import pytest
from glue_fixtures import write_cola, write_mnli, write_simple

from fairseq_moe_plugin.tasks.glue_data import (
    TASKS,
    GlueFormatError,
    check_label_sets,
    glue_task,
    read_split,
)


def test_mnli_train_dev_test_columns(tmp_path):
    d = write_mnli(tmp_path, {
        "train": [("A man sleeps .", "A person rests .", "entailment"),
                  ("It is \"red\" .", "It is blue .", "contradiction")],
        "dev_matched": [("x y", "y x", "neutral")],
        "dev_mismatched": [("p", "q", "entailment")],
        "test_matched": [("t1", "t2", None)],
    })  # fmt: skip
    task = glue_task("MNLI")
    train = read_split(d, task, "train")
    assert [(e.text_a, e.text_b, e.label) for e in train] == [
        ("A man sleeps .", "A person rests .", "entailment"),
        ('It is "red" .', "It is blue .", "contradiction"),  # quotes are text, not CSV quoting
    ]
    assert train[1].line == 3 and train[1].index == "1"
    (dev,) = read_split(d, task, "dev_matched")
    assert (dev.text_a, dev.label) == ("x y", "neutral")
    (test,) = read_split(d, task, "test_matched")
    assert test.label is None and test.index == "0"


def test_cola_is_headerless_except_test(tmp_path):
    d = write_cola(tmp_path, {"train": [("The book fell .", "1"), ("Book the fell .", "0")],
                              "test": [("Is this fine ?", None)]})  # fmt: skip
    train = read_split(d, glue_task("CoLA"), "train")
    assert [(e.text_a, e.label, e.line, e.index) for e in train] == [
        ("The book fell .", "1", 1, "0"), ("Book the fell .", "0", 2, "1")]  # fmt: skip
    (test,) = read_split(d, glue_task("CoLA"), "test")
    assert (test.index, test.text_a, test.label) == ("0", "Is this fine ?", None)


def test_stsb_is_regression_and_mrpc_reads_quality_first(tmp_path):
    sts = write_simple(tmp_path, "STS-B", "\t".join(["index", "genre", "filename", "year",
                       "old_index", "source1", "source2", "sentence1", "sentence2", "score"]),
                       {"train": ["0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA dog .\tA cat .\t1.250"]})  # fmt: skip
    (ex,) = read_split(sts, glue_task("STS-B"), "train")
    assert (ex.text_a, ex.text_b, ex.label) == ("A dog .", "A cat .", "1.250")
    assert glue_task("STS-B").is_regression and glue_task("STS-B").num_classes == 1
    mrpc = write_simple(tmp_path, "MRPC", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                        {"dev": ["1\t702876\t702977\tHe said .\tHe told ."]})  # fmt: skip
    (ex,) = read_split(mrpc, glue_task("MRPC"), "dev")
    assert (ex.label, ex.text_a, ex.text_b) == ("1", "He said .", "He told .")


def test_every_official_task_is_known_with_its_label_set():
    assert set(TASKS) == {"CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"}
    assert TASKS["QNLI"].labels == ("entailment", "not_entailment")
    assert TASKS["MNLI"].dev_splits == ("dev_matched", "dev_mismatched")
    with pytest.raises(ValueError, match="unknown GLUE task 'SST2'"):
        glue_task("SST2")


def test_bad_rows_name_file_line_and_expectation(tmp_path):
    d = write_simple(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel",
                     {"train": ["0\ta\tb\tentailment", "1\ta\tb"],
                      "dev": ["0\ta\tb\tmaybe"], "test": []})  # fmt: skip
    task = glue_task("RTE")
    with pytest.raises(
        GlueFormatError, match=r"RTE/train.tsv:3: 3 columns, expected 4 for RTE train"
    ):
        read_split(d, task, "train")
    with pytest.raises(GlueFormatError, match=r"dev.tsv:2: unknown label 'maybe', expected one of "
                                              r"entailment, not_entailment"):  # fmt: skip
        read_split(d, task, "dev")
    with pytest.raises(GlueFormatError, match=r"test.tsv: empty file"):
        read_split(d, task, "test")
    with pytest.raises(
        GlueFormatError, match=r"RTE has no split 'dev_matched'; its splits are train, dev, test"
    ):
        read_split(d, task, "dev_matched")
    (d / "test.tsv").unlink()
    with pytest.raises(GlueFormatError, match=r"test.tsv: missing RTE test file"):
        read_split(d, task, "test")
    with pytest.raises(GlueFormatError, match=r"header has 3 columns, expected 4"):
        (d / "train.tsv").write_text("index\tsentence1\tsentence2\n0\ta\tb\tentailment\n")
        read_split(d, task, "train")


def test_a_dev_label_unseen_in_train_is_an_error(tmp_path):
    d = write_simple(tmp_path, "SST-2", "sentence\tlabel",
                     {"train": ["good\t1", "great\t1"], "dev": ["bad\t0"]})  # fmt: skip
    task = glue_task("SST-2")
    splits = {s: read_split(d, task, s) for s in ("train", "dev")}
    with pytest.raises(GlueFormatError, match=r"dev has labels \['0'\] that train.tsv never uses"):
        check_label_sets(task, splits)

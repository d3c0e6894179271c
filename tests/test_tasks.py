import json
from pathlib import Path

import pytest

from envs.data.corpus import split_of
from envs.tasks import MIXES, Item, TaskFormatError, load_mix, load_task, make_item, mix_spec, read_jsonl_task
from envs.tasks.items import split_key

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEGYM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_split_is_a_fixed_hash():
    # The SHA-256 split never changes across runs, machines or Python versions.
    assert [split_of(s) for s in ("alpha", "beta", "gamma", "delta")] == ["train", "test", "val", "train"]


@pytest.mark.parametrize("task", ["gen/copy-4", "gen/kv-3:mc", "gen/add-2", "gen/mul-2:mc"])
def test_generated_splits_disjoint_stable_and_complete(task, empty_cache):
    every = load_task(task, None)
    parts = {s: load_task(task, s) for s in ("train", "val", "test")}
    ids = {s: {it.id for it in items} for s, items in parts.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert ids["train"] | ids["val"] | ids["test"] == {it.id for it in every}
    assert all(len(v) > 20 for v in ids.values())
    again = load_task(task, "val")
    assert [(it.id, it.prompt, it.answer, it.choices) for it in again] == [
        (it.id, it.prompt, it.answer, it.choices) for it in parts["val"]
    ]
    for it in parts["val"]:
        assert it.split == "val" == split_of(split_key(it.prompt, it.answer))
        if it.kind == "mc":
            assert it.answer in it.choices and len(set(it.choices)) == len(it.choices)


def test_generated_difficulty_is_a_parameter(empty_cache):
    short = load_task("gen/copy-3", "val")[0]
    long = load_task("gen/copy-20", "val")[0]
    assert len(short.answer) == 3 and len(long.answer) == 20
    add = load_task("gen/add-4", "val")[0]
    a, b = (int(x) for x in add.prompt.split("What is ")[1].rstrip("?\nA:").split(" plus "))
    assert int(add.answer) == a + b and 1000 <= a <= 9999


def test_shots_come_from_train_and_keep_the_split(empty_cache):
    plain = {it.id: it for it in load_task("gen/add-2", "val")}
    shot = load_task("gen/add-2:2shot", "val")
    train_prompts = {it.prompt for it in load_task("gen/add-2", "train")}
    assert {it.id.replace(":2shot", "") for it in shot} == set(plain)
    for it in shot:
        base = plain[it.id.replace(":2shot", "")]
        assert it.prompt.endswith(base.prompt) and it.prompt != base.prompt
        blocks = it.prompt.split("\n\n")[:2]
        assert all(any(b.startswith(p) for p in train_prompts) for b in blocks)
        assert it.meta["split"] == "val"


def test_jsonl_task_loads_and_splits(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"Q{i}?", "answer": "yes" if i % 2 else "no", "choices": ["yes", "no"]} for i in range(40)]
    rows += [{"prompt": f"Say {i}", "answer": str(i)} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_jsonl_task(path)
    assert len(items) == 80
    assert sum(it.kind == "mc" for it in items) == 40 and sum(it.kind == "exact" for it in items) == 40
    val = load_task(f"jsonl:{path}", "val")
    train = load_task(f"jsonl:{path}", "train")
    assert val and train and not {i.id for i in val} & {i.id for i in train}
    assert all(it.task == f"jsonl:{path}" for it in val)
    assert load_task(f"jsonl:{path}::1shot", "val")[0].prompt.count("\n\n") == 1


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("{not json", "<json>"),
        ('{"answer": "a"}', "prompt"),
        ('{"prompt": "p"}', "answer"),
        ('{"prompt": "p", "answer": 3}', "answer"),
        ('{"prompt": "p", "answer": "a", "choices": ["a"]}', "choices"),
        ('{"prompt": "p", "answer": "c", "choices": ["a", "b"]}', "answer"),
        ('{"prompt": "p", "answer": "a", "kind": "mc"}', "kind"),
        ('["p", "a"]', "<row>"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "answer": "fine"}\n\n' + line + "\n")
    with pytest.raises(TaskFormatError) as err:
        read_jsonl_task(path)
    msg = str(err.value)
    assert str(path) in msg and "line 3" in msg and repr(field) in msg
    assert err.value.line == 3 and err.value.field == field


def test_missing_cache_names_the_command(empty_cache):
    for task in ("gensim/polarity", "gensim/news", "bigbench/general_knowledge"):
        with pytest.raises(FileNotFoundError, match=r"python -m experiments\.data"):
            load_task(task, "val")


def _write_bigbench(cache: Path, task: str, payload) -> Path:
    path = cache / "data" / "bigbench" / task / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_bigbench_fixture_mc_and_exact(empty_cache):
    examples = [
        {"input": f"What is {i} plus 1?", "target": str(i + 1), "target_scores": {str(i + 1): 1, "banana": 0}}
        for i in range(30)
    ]
    _write_bigbench(empty_cache, "arithmetic/1_digit_addition", {"name": "x", "examples": examples})
    mc = load_task("bigbench/arithmetic/1_digit_addition", None)
    ex = load_task("bigbench/arithmetic/1_digit_addition:exact", None)
    assert len(mc) == len(ex) == 30
    assert all(it.kind == "mc" and it.choices is not None and "banana" in it.choices for it in mc)
    assert all(it.kind == "exact" and it.choices is None for it in ex)
    first = next(it for it in ex if it.prompt == "Q: What is 0 plus 1?\nA:")
    assert first.answer == "1"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"name": "x"}, "examples"),
        ({"examples": [{"target": "1"}]}, "examples[0].input"),
        ({"examples": [{"input": "q", "target_scores": {"a": 1}}]}, "examples[0].target_scores"),
        ("{broken", "<json>"),
    ],
)
def test_malformed_bigbench_names_file_and_field(empty_cache, payload, field):
    path = _write_bigbench(empty_cache, "general_knowledge", payload)
    with pytest.raises(TaskFormatError) as err:
        load_task("bigbench/general_knowledge", "val")
    assert str(path) in str(err.value) and repr(field) in str(err.value)


def test_polarity_reads_cp1252(empty_cache):
    folder = empty_cache / "data" / "gensim"
    folder.mkdir(parents=True)
    lines = [f"__label__pos a caf\xe9 film number {i} .".encode("cp1252") for i in range(20)]
    lines += [f"__label__neg dull film {i} .".encode("cp1252") for i in range(20)]
    (folder / "pang_lee_polarity.cor").write_bytes(b"\n".join(lines))
    items = load_task("gensim/polarity", None)
    assert len(items) == 40
    assert any("caf\xe9" in it.prompt for it in items)
    assert {it.answer for it in items} == {"positive", "negative"}
    (folder / "pang_lee_polarity.cor").write_bytes(b"__label__maybe so so .\n")
    with pytest.raises(TaskFormatError, match="line 1"):
        load_task("gensim/polarity", None)


def test_item_validation():
    with pytest.raises(ValueError, match="not one of its choices"):
        make_item("t", "p", "z", choices=["a", "b"])
    with pytest.raises(ValueError, match="kind"):
        Item("i", "t", "p", "a", None, "essay")  # type: ignore[arg-type]
    it = make_item("t", "p", "a", choices=["b", "a"])
    assert it.label == 1 and it.kind == "mc" and it.id.startswith("t#")


def test_unknown_task_and_option():
    with pytest.raises(KeyError, match="unknown task"):
        load_task("nope/x", "val")
    with pytest.raises(ValueError, match="option"):
        load_task("gen/add-2:fancy", "val")


def test_hf_task_needs_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_task("hf:someone/something", "val")
    else:
        pytest.skip("datasets is installed; the missing-package message cannot be checked")


def test_mix_proportions_and_seed(empty_cache):
    items = load_mix("generated", "val", n=60, seed=0)
    assert len(items) == 60
    counts = {t: sum(it.task == t for it in items) for t in MIXES["generated"]}
    assert all(c == 10 for c in counts.values())
    assert [it.id for it in load_mix("generated", "val", n=60, seed=0)] == [it.id for it in items]
    assert [it.id for it in load_mix("generated", "val", n=60, seed=1)] != [it.id for it in items]
    tasks = [it.task for it in items]
    assert tasks != sorted(tasks)  # interleaved, not task after task
    every = load_mix({"gen/add-1": 1.0, "gen/add-2": 3.0}, "val")
    assert len(every) == len(load_task("gen/add-1", "val")) + len(load_task("gen/add-2", "val"))
    n_small = len(load_task("gen/add-1", "val"))  # 1-digit sums: few distinct items
    capped = load_mix({"gen/add-1": 100.0, "gen/add-2": 1.0}, "val", n=n_small + 10)
    assert len(capped) == n_small + 10
    assert sum(it.task == "gen/add-1" for it in capped) == n_small  # capped; the rest comes from add-2


def test_mix_yaml_and_conf_files(tmp_path, empty_cache):
    path = tmp_path / "m.yaml"
    path.write_text("tasks:\n  gen/add-1: 1\n  gen/copy-3: 2\n")
    assert mix_spec(path) == {"gen/add-1": 1.0, "gen/copy-3": 2.0}
    assert len(load_mix(path, "val", n=9)) == 9
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [1, 2]\n")
    with pytest.raises(ValueError, match="tasks"):
        mix_spec(bad)
    confs = sorted((REPO / "conf" / "task").glob("*.yaml"))
    assert confs
    for conf in confs:
        assert mix_spec(conf)

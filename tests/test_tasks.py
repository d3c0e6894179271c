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


@pytest.mark.parametrize("task", ["gen/copy-4", "gen/kv-3:mc", "gen/add-2", "gen/sub-2:mc", "gen/mul-2:mc"])
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
    for sub in load_task("gen/sub-3:mc", "val"):
        a, b = (int(x) for x in sub.prompt.split("What is ")[1].rstrip("?\nA:").split(" minus "))
        assert int(sub.answer) == a - b and 100 <= a <= 999 and 100 <= b <= 999
        assert sub.answer in sub.choices and len(set(sub.choices)) == 4
    assert any(int(it.answer) < 0 for it in load_task("gen/sub-2", "val"))


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
    for task in ("gensim/polarity", "gensim/news", "gensim/facts", "gensim/odd-one-out", "bigbench/general_knowledge"):
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


_ANALOGY = """: capital-common-countries
Athens Greece Berlin Germany
Paris France Rome Italy
: capital-world
Abuja Nigeria Accra Ghana
Tbilisi Georgia Lima Peru
Madrid Spain Oslo Norway
: currency
Algeria dinar Japan yen
Mexico peso Poland zloty
Europe euro Russia ruble
: city-in-state
Chicago Illinois Houston Texas
Atlanta Georgia Boston Massachusetts
Denver Colorado Phoenix Arizona
: gram6-nationality-adjective
Albania Albanian Greece Greek
France French Spain Spanish
Italy Italian Peru Peruvian
"""


def _write_analogy(cache: Path, text: str = _ANALOGY) -> Path:
    path = cache / "data" / "gensim" / "questions-words.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_facts_are_true_to_the_file_with_distractors_of_the_same_relation(empty_cache):
    from envs.tasks.sources import FACT_RELATIONS, analogy_sections

    _write_analogy(empty_cache)
    sections = analogy_sections()
    every = load_task("gensim/facts", None)
    per_relation = {r: load_task(f"gensim/facts/{r}", None) for r in FACT_RELATIONS}
    assert len(every) == sum(len(v) for v in per_relation.values())
    capital = {it.prompt: it for it in per_relation["capital"]}
    assert capital["Q: What is the capital of Georgia?\nA:"].answer == "Tbilisi"
    assert capital["Q: What is the capital of Greece?\nA:"].answer == "Athens"
    state = {it.prompt: it.answer for it in per_relation["state"]}
    assert state["Q: In which US state is the city of Atlanta?\nA:"] == "Georgia"
    for rel, items in per_relation.items():
        answers = {it.answer for it in items}
        for it in items:
            assert it.kind == "mc" and it.answer in it.choices and len(set(it.choices)) == 4
            assert set(it.choices) <= answers  # distractors are answers of the same relation
            assert it.meta["relation"] == rel
    pairs = {p for name in FACT_RELATIONS["currency"][0] for p in sections[name]}
    assert {(it.prompt.split(" of ")[1].removesuffix("?\nA:"), it.answer) for it in per_relation["currency"]} == pairs
    # Deterministic across loads, and splits partition the items.
    again = load_task("gensim/facts", None)
    assert [(it.id, it.choices) for it in again] == [(it.id, it.choices) for it in every]
    ids = [{it.id for it in load_task("gensim/facts", s)} for s in ("train", "val", "test")]
    assert set().union(*ids) == {it.id for it in every} and sum(map(len, ids)) == len(every)


def test_odd_one_out_has_exactly_one_word_of_another_category(empty_cache):
    from envs.tasks.sources import FACT_RELATIONS, ODD_CATEGORIES, analogy_sections

    _write_analogy(empty_cache)
    sections = analogy_sections()
    cats = {
        c: {p[side] for name in FACT_RELATIONS[rel][0] for p in sections[name]}
        for c, (rel, side) in ODD_CATEGORIES.items()
    }
    items = load_task("gensim/odd-one-out", None)
    assert len(items) > 50
    for it in items:
        same, odd = it.meta["categories"]
        assert same != odd and it.answer in cats[odd] and it.answer not in cats[same]
        others = [c for c in it.choices if c != it.answer]
        assert len(others) == 3 and all(w in cats[same] and w not in cats[odd] for w in others)
        assert "Georgia" not in it.choices  # a country and a US state: never used
        assert it.prompt.endswith(f"{', '.join(it.choices)}?\nA:")


def test_malformed_analogy_file_names_line(empty_cache):
    path = _write_analogy(empty_cache, ": capital-world\nAbuja Nigeria Accra\n")
    with pytest.raises(TaskFormatError) as err:
        load_task("gensim/facts", "val")
    assert str(path) in str(err.value) and "line 2" in str(err.value)
    with pytest.raises(KeyError, match="relation"):
        load_task("gensim/facts/planets", "val")


def test_builtin_mixes_need_no_bigbench_except_the_bigbench_one():
    # The registry no longer serves the bigbench release with task files: every mix the suite runs
    # by default builds from the gensim wheel and seeded generators.
    for name, spec in MIXES.items():
        uses = [t for t in spec if t.startswith("bigbench/")]
        assert bool(uses) == (name == "mc-bigbench"), (name, uses)
    for conf in sorted((REPO / "conf" / "task").glob("*.yaml")):
        uses = [t for t in mix_spec(conf) if t.startswith("bigbench/")]
        assert bool(uses) == (conf.stem == "mc_bigbench"), (conf.name, uses)


def test_data_command_warns_without_bigbench_and_fails_when_required(monkeypatch, empty_cache, capsys):
    import experiments.data as data_cmd

    def no_bigbench(**_):
        raise RuntimeError("`pip download bigbench==1.0.0` gave no BIG-bench task files\nmore detail")

    monkeypatch.setattr(data_cmd, "prepare_gensim", lambda force=False: empty_cache / "data" / "gensim")
    monkeypatch.setattr(data_cmd, "prepare_bigbench", no_bigbench)
    data_cmd.main([])
    err = capsys.readouterr().err
    assert "warning: BIG-bench task files unavailable" in err and "gave no BIG-bench task files" in err
    with pytest.raises(RuntimeError, match="gave no BIG-bench"):
        data_cmd.main(["--require-bigbench"])


def test_gensim_cache_is_extracted_again_when_a_file_is_missing(monkeypatch, empty_cache, tmp_path):
    import zipfile

    from envs.data import corpus

    wheel = tmp_path / "gensim-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, member in corpus.GENSIM_FILES.items():
            zf.writestr(member, f"contents of {name}\n")
    calls = []

    def fake_download(req, dest):
        calls.append(req)
        return wheel

    monkeypatch.setattr(corpus, "pip_download", fake_download)
    out = corpus.prepare_gensim()
    assert len(calls) == 1 and all((out / n).read_text() == f"contents of {n}\n" for n in corpus.GENSIM_FILES)
    corpus.prepare_gensim()
    assert len(calls) == 1  # complete cache: nothing fetched
    (out / "questions-words.txt").unlink()  # a cache built before the facts were added
    corpus.prepare_gensim()
    assert len(calls) == 2 and (out / "questions-words.txt").is_file()

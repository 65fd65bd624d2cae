"""The README and docs/ against the code they describe.

Every list of methods, models, datasets, engines and profiles in README.md and docs/*.md is checked
against conf/ (and conf/ against the registries), every relative link must resolve, the README stays
short enough to scan, and its extension examples run against the code base.

Conventions (docs/testing.md repeats them for writers):

- A table whose first header cell is `` `X=` `` (X: method, engine, model, data) names options of
  conf/X/ in its first column, in backticks. In README.md the `method=` and `engine=` tables name all
  of them. "All methods" are the *plain* method configs: the files of conf/method/ in the `method`
  package (no `# @package _global_` line), which set `method.*` only and name a registered method
  (themselves or through their defaults, as contsup_e names contsup). The `_global_` files set keys of
  other groups too and are no table rows: method × engine pairs (they override /engine; the README
  names them in a `list:method_pair`) and tuned exports (`tuned_by`, written by sweeps; they come and
  go as studies run, so no document lists them). A `_global_` file that is neither fails the test, so
  a new kind gets a decision here.
- `<!-- list:G -->` … `<!-- /list -->` wraps a complete list of group G (a conf/ group, or
  method_pair): the backticked names inside must be exactly the group's options.
  `<!-- sublist:G -->` … `<!-- /list -->` wraps a partial one: names must exist.
- Outside those markers, the `X=` tables and code blocks (commands, file trees), a line naming three or
  more options of one group fails: an unmarked list would go stale unnoticed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
MAX_README_LINES = 260
LIST_GROUPS = ("data", "model", "engine", "method", "profile")  # the groups an unmarked list is looked for
TABLE_GROUPS = ("method", "engine", "model", "data")


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def conf_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def method_config_kind(stem: str) -> str:
    """plain | pair | tuned | unknown (see the module docstring)."""
    text = (CONF / "method" / f"{stem}.yaml").read_text()
    if not re.search(r"^#\s*@package\s+_global_\s*$", text, re.M):
        return "plain"
    config = yaml.safe_load(text) or {}
    if "tuned_by" in config:
        return "tuned"
    defaults = config.get("defaults") or []
    if any(isinstance(item, dict) and any(str(key).startswith("override /engine") for key in item) for item in defaults):
        return "pair"
    return "unknown"


def method_configs(kind: str) -> list[str]:
    return [stem for stem in conf_options("method") if method_config_kind(stem) == kind]


def registered_method(stem: str) -> str:
    """The method a plain config trains: its `name`, or its first default's."""
    config = yaml.safe_load((CONF / "method" / f"{stem}.yaml").read_text()) or {}
    if "name" in config:
        return config["name"]
    parents = [item for item in config.get("defaults") or [] if isinstance(item, str) and item != "_self_"]
    assert parents, f"conf/method/{stem}.yaml has no name and no default to take it from"
    return registered_method(parents[0])


def group_options(group: str) -> list[str]:
    """What a complete list of `group` must name."""
    if group == "method":
        return method_configs("plain")
    if group == "method_pair":
        return method_configs("pair")
    assert (CONF / group).is_dir(), f"no config group {group!r} (conf/{group}/ does not exist)"
    return conf_options(group)


def without_code_blocks(text: str) -> str:
    """`text` with fenced code blocks blanked, line numbers kept."""
    lines, inside = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            inside = not inside
            lines.append("")
        else:
            lines.append("" if inside else line)
    return "\n".join(lines)


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\s]+)`", text)


# --- tables -------------------------------------------------------------------------------------


def option_tables(path: Path) -> list[tuple[str, int, list[str]]]:
    """(group, header line number, first-column names) of every `X=` table in `path`."""
    lines = without_code_blocks(path.read_text()).split("\n")
    tables = []
    for i, line in enumerate(lines[:-1]):
        if not (line.startswith("|") and re.match(r"^\|\s*:?-", lines[i + 1])):
            continue
        header = re.match(r"^\|\s*`(\w+)=`\s*\|", line)
        if not header:
            continue
        names = []
        for row in lines[i + 2:]:
            if not row.startswith("|"):
                break
            names += backticked(row.split("|")[1])
        tables.append((header.group(1), i + 1, names))
    return tables


def readme_table(group: str) -> list[str]:
    tables = [names for name, _, names in option_tables(README) if name == group]
    assert len(tables) == 1, f"README.md should have one table headed `{group}=`, found {len(tables)}"
    return tables[0]


def test_method_configs_are_all_classified() -> None:
    unknown = method_configs("unknown")
    assert not unknown, (
        f"conf/method/{unknown[0]}.yaml is in the _global_ package but is neither a method × engine pair nor a "
        "tuned export: decide how the docs list it (tests/test_docs.py)"
    )


def test_readme_method_table_names_every_plain_method_config() -> None:
    names = readme_table("method")
    assert len(names) == len(set(names)), f"a method is listed twice: {names}"
    assert sorted(names) == method_configs("plain")


def test_readme_engine_table_names_every_engine_config() -> None:
    names = readme_table("engine")
    assert len(names) == len(set(names)), f"an engine is listed twice: {names}"
    assert sorted(names) == conf_options("engine")


@pytest.mark.parametrize("path", DOCUMENTS, ids=relative)
def test_option_tables_name_only_existing_options(path: Path) -> None:
    for group, line, names in option_tables(path):
        assert group in TABLE_GROUPS, f"{relative(path)}:{line}: a `{group}=` table: no such config group is checked"
        assert names, f"{relative(path)}:{line}: the `{group}=` table names nothing in backticks"
        unknown = sorted(set(names) - set(conf_options(group)))
        assert not unknown, f"{relative(path)}:{line}: `{group}=` table names {unknown}, not in conf/{group}/"


# --- marked lists -------------------------------------------------------------------------------

MARKER = re.compile(r"<!--\s*(list|sublist):(\w+)\s*-->(.*?)<!--\s*/list\s*-->", re.S)


def marked_text(path: Path) -> str:
    """The document as markers are read in it: without code blocks, nor inline code that shows a marker."""
    return re.sub(r"`[^`\n]*`", lambda code: "" if "<!--" in code.group(0) else code.group(0), without_code_blocks(path.read_text()))


@pytest.mark.parametrize("path", DOCUMENTS, ids=relative)
def test_marked_lists_match_conf(path: Path) -> None:
    text = marked_text(path)
    openers = len(re.findall(r"<!--\s*(?:list|sublist):", text))
    closers = len(re.findall(r"<!--\s*/list\s*-->", text))
    spans = list(MARKER.finditer(text))
    assert openers == closers == len(spans), f"{relative(path)}: {openers} list markers opened, {closers} closed"
    for span in spans:
        kind, group, body = span.groups()
        line = text.count("\n", 0, span.start()) + 1
        names = backticked(body)
        expected = group_options(group)
        assert names, f"{relative(path)}:{line}: the {kind}:{group} list names nothing in backticks"
        assert len(names) == len(set(names)), f"{relative(path)}:{line}: {kind}:{group} names an option twice"
        if kind == "list":
            assert sorted(names) == expected, (
                f"{relative(path)}:{line}: list:{group} names {sorted(names)}; conf/ has {expected}"
            )
        else:
            unknown = sorted(set(names) - set(expected))
            assert not unknown, f"{relative(path)}:{line}: sublist:{group} names {unknown}, which conf/ does not have"


def test_readme_lists_datasets_models_and_profiles() -> None:
    """The README's own lists are marked, so the check above reaches them."""
    groups = {span.group(2) for span in MARKER.finditer(marked_text(README)) if span.group(1) == "list"}
    assert {"data", "model", "profile", "method_pair"} <= groups


def mention(name: str) -> re.Pattern[str]:
    """`name` as an option: not part of a longer word, a path or a file name (bp.py, conf/method/bp.yaml)."""
    return re.compile(rf"(?<![\w./-]){re.escape(name)}(?![\w/-]|\.\w)")


@pytest.mark.parametrize("path", DOCUMENTS, ids=relative)
def test_no_unmarked_lists(path: Path) -> None:
    text = MARKER.sub(lambda span: "\n" * span.group(0).count("\n"), marked_text(path))
    lines = text.split("\n")
    for _, header, names in option_tables(path):  # checked as tables
        for i in range(header - 1, len(lines)):
            if not lines[i].startswith("|"):
                break
            lines[i] = ""
    patterns = {group: [(name, mention(name)) for name in group_options(group)] for group in LIST_GROUPS}
    patterns["method"] += [(name, mention(name)) for name in method_configs("pair")]
    for number, line in enumerate(lines, 1):
        for group, options in patterns.items():
            named = sorted(name for name, pattern in options if pattern.search(line))
            assert len(named) < 3, (
                f"{relative(path)}:{number} lists {group} options {named} outside a list marker: wrap a complete "
                f"list in <!-- list:{group} -->…<!-- /list --> or a partial one in <!-- sublist:{group} -->…<!-- /list -->"
            )


def test_conf_groups_match_the_registries() -> None:
    """What the documents are checked against is itself what the code registers."""
    from scpl_kit.data import SOURCES
    from scpl_kit.engines import ENGINES
    from scpl_kit.methods import METHODS
    from scpl_kit.models import MODELS

    assert conf_options("data") == SOURCES.names()
    assert conf_options("model") == MODELS.names()
    assert conf_options("engine") == ENGINES.names()
    assert sorted({registered_method(stem) for stem in method_configs("plain")}) == METHODS.names()


# --- links and length ---------------------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 … for repeats."""
    slugs, counts = set(), {}
    for line in without_code_blocks(path.read_text()).split("\n"):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        repeat = counts.get(slug, 0)
        slugs.add(f"{slug}-{repeat}" if repeat else slug)
        counts[slug] = repeat + 1
    return slugs


@pytest.mark.parametrize("path", DOCUMENTS, ids=relative)
def test_relative_links_resolve(path: Path) -> None:
    text = re.sub(r"`[^`\n]*`", "", without_code_blocks(path.read_text()))
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{relative(path)} links to {target}: {file} does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{relative(path)} links to {target}: {relative(linked)} has no heading #{anchor}"


def test_docs_are_linked_from_the_readme() -> None:
    text = README.read_text()
    unlinked = [relative(doc) for doc in DOCUMENTS[1:] if f"({relative(doc)})" not in text and f"({relative(doc)}#" not in text]
    assert not unlinked, f"README.md does not link to {unlinked}"


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; keep it to {MAX_README_LINES} and move detail to docs/"


# --- the README's extension examples ------------------------------------------------------------


def extension_examples() -> dict[str, dict[str, str]]:
    """{'method' | 'model' | 'dataset' | 'engine': {'python': code, 'yaml': config}} from README's "## Extending"."""
    text = README.read_text()
    section = re.search(r"^## Extending\s*$(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Extending' section"
    examples = {}
    for part in re.split(r"^### ", section.group(1), flags=re.M)[1:]:
        title = part.split("\n", 1)[0].strip()
        kind = re.fullmatch(r"Add an? (method|model|dataset|engine)", title)
        assert kind, f"unexpected heading under '## Extending': ### {title}"
        blocks = dict.fromkeys(("python", "yaml"), "")
        for language, body in re.findall(r"^```(\w+)\n(.*?)^```", part, re.S | re.M):
            assert language in blocks and not blocks[language], f"### {title}: one python and one yaml block, please"
            blocks[language] = body
        assert all(blocks.values()), f"### {title} needs a python block and a yaml block"
        examples[kind.group(1)] = blocks
    assert sorted(examples) == ["dataset", "engine", "method", "model"]
    return examples


# Runs in a fresh interpreter: the examples register names, which must not leak into other tests' registries.
CHECK_EXAMPLES = r"""
import json, math, sys
from pathlib import Path
import torch, yaml

examples = json.load(sys.stdin)
for kind, blocks in examples.items():
    exec(compile(blocks["python"], f"<README: add a {kind}>", "exec"), {"__name__": f"readme_{kind}"})
config = {kind: yaml.safe_load(blocks["yaml"]) for kind, blocks in examples.items()}

from scpl_kit.data import SOURCES, dataset_facts
from scpl_kit.engines import build_engine
from scpl_kit.methods import build_units
from scpl_kit.models import build_model
from scpl_kit.updater import OptimizerSettings, UpdateRecipe

data = config["dataset"]
raw = SOURCES.get(data["name"])(Path("data/raw"), False)
facts = dataset_facts(data["name"])
assert raw.images.dtype.name == "uint8" and tuple(raw.images.shape[1:]) == facts.input_shape, (raw.images.shape, facts)
assert raw.labels.dtype.name == "int64" and len(raw.labels) == len(raw.images) and len(raw.classes) == facts.num_classes

torch.manual_seed(0)
model_options = dict(config["model"])
model = build_model(model_options.pop("name"), facts.input_shape, facts.num_classes, **model_options)
method_options = dict(config["method"])
units = build_units(method_options.pop("name"), model, facts.num_classes, **method_options)
engine_options = dict(config["engine"])
engine = build_engine(engine_options.pop("name"), **engine_options)
engine.setup(units, model.example_batch(32, facts.num_classes), UpdateRecipe(OptimizerSettings(), steps_per_epoch=2, epochs=1))
x = torch.as_tensor(raw.images[:64]).float() / 255
y = torch.as_tensor(raw.labels[:64])
losses = engine.train_epoch([(x[:32], y[:32]), (x[32:], y[32:])])
assert losses and all(math.isfinite(v) for v in losses.values()), losses
scores = engine.predict([(x, y)])["scores"]
assert tuple(scores.shape) == (64, facts.num_classes), scores.shape
print(json.dumps({"units": len(units), "losses": sorted(losses), "stats": engine.epoch_stats()}))
"""


def test_readme_extension_examples_run() -> None:
    """Each example registers under the name its config gives, and together they train: the dataset's
    images through the model, cut into units by the method, for two batches under the engine."""
    examples = extension_examples()
    result = subprocess.run(
        [sys.executable, "-c", CHECK_EXAMPLES], input=json.dumps(examples), capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["units"] >= 2 and report["stats"], report
    for kind, blocks in examples.items():
        config = yaml.safe_load(blocks["yaml"])
        assert re.search(rf'register\w*\("{re.escape(config["name"])}"', blocks["python"]), (
            f"the {kind} example's config names {config['name']!r}, which its code does not register"
        )


def test_deviations_state_what_the_configs_compose_to() -> None:
    """docs/deviations.md: in every section with a `<!-- compose: ... -->` line, each `key: value` of a
    table's kit column is what that configuration composes to."""
    import re

    from omegaconf import OmegaConf

    from scpl_kit.config import compose_config

    text = (REPO / "docs" / "deviations.md").read_text()
    sections = re.split(r"<!-- compose: (.+?) -->", text)[1:]
    assert len(sections) >= 8 * 2, "every method's section names its configuration"
    checked = 0
    for overrides, body in zip(sections[::2], sections[1::2]):
        cfg = compose_config(overrides.split())
        body = body.split("\n## ")[0]  # up to the next section
        for row in (line for line in body.splitlines() if line.startswith("|") and not line.startswith("|---")):
            kit = [c.strip() for c in row.strip("|").split("|")][2]  # every table's third column is the kit's
            for key, value in re.findall(r"`([a-z_]+\.[a-z_.]+): ([^`]+)`", kit):
                got = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}), resolve=True)["v"]
                assert got == yaml.safe_load(value), f"deviations.md ({overrides}): {key} is {got!r}, the page says {value}"
                checked += 1
    assert checked >= 40, checked

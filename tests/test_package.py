"""The package as users get it: a wheel that carries its configs and launch files, and a code base
whose stages import only from the stages before them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

# The data path: each module may import from its own stage (without cycles) or an earlier one.
STAGES = [
    "errors",
    "labels",
    "tracks",
    "config",
    "console",
    "data",
    "models",
    "engine",
    "results",
    "jobs",
    "bench",
    "train",
    "cli",
]
# Inside data/: the shard contract first; reading and packing the dataset, and streaming the shards
# back, each build on it and never on each other (the stream never loads the packer's PyAV).
DATA_STAGES = {"shards": {"shards"}, "packing": {"shards", "packing"}, "stream": {"shards", "stream"}}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=out)
    (found,) = out.glob("fer_dist-*.whl")
    return found


def test_the_wheel_carries_the_configs_and_launch_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("configs", "launch"):
        shipped = {p.name for p in (REPO / folder).iterdir() if p.suffix in (".yaml", ".json")}
        assert shipped and {f"fer_dist/{folder}/{name}" for name in shipped} <= names, folder
    assert not any(n.startswith(("tests/", "configs/", "launch/")) for n in names)  # one copy, inside the package


def test_the_installed_wheel_finds_its_files_away_from_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    for command in ("demo", "bench"):
        assert "usage: fer-dist " + command in run("-m", "fer_dist.cli", command, "--help")
    probe = (
        "import fer_dist, fer_dist.config as c, fer_dist.jobs.demo as d;"
        "print(fer_dist.__file__, c.CONFIGS, c.LAUNCH, d.CONFIG.exists(), (c.LAUNCH / 'cpu.yaml').exists());"
        "print(c.load('mfm_cpu').model['name'], len(list(c.CONFIGS.glob('*.yaml'))))"
    )
    where, names = run("-c", probe).splitlines()
    package, configs, launch, demo_config, cpu_launch = where.split()
    assert all(Path(p).is_relative_to(site) for p in (package, configs, launch)), where
    assert demo_config == cpu_launch == "True"
    assert names == f"mfm {len(list((REPO / 'configs').glob('*.yaml')))}"


def imports(path: Path) -> set[str]:
    """The fer_dist modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fer_dist"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fer_dist")}
    return found


def test_each_stage_imports_only_from_earlier_stages_and_nothing_imports_in_a_circle():
    package = REPO / "fer_dist"
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in package.rglob("*.py")
    }

    def stage(module: str) -> int:
        return STAGES.index(module.split(".")[1]) if module != "fer_dist" else -1

    def data_stage(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if len(parts) > 3 and parts[1] == "data" else None

    assert {data_stage(m) for m in modules} - {None} == set(DATA_STAGES), "every data/ module in a sub-package"
    graph = {}
    for name, path in modules.items():
        targets = {t for t in imports(path) if t in modules and t != name}
        graph[name] = targets
        backwards = [t for t in targets if stage(t) > stage(name)]
        assert not backwards, f"{name} (stage {STAGES[stage(name)]}) imports later stages: {backwards}"
        if data_stage(name):
            across = [t for t in targets if data_stage(t) and data_stage(t) not in DATA_STAGES[data_stage(name)]]
            assert not across, f"{name} (data/{data_stage(name)}) imports {across}"

    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, "import cycle: " + " -> ".join([*path[path.index(node) :], node])
        if node not in done:
            for target in sorted(graph[node]):
                visit(target, [*path, node])
            done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_the_stream_and_the_manifest_load_neither_pyav_nor_torchaudio():
    """The stream and the shard contract (every reader of a manifest) import no decoder of video or
    sound: a loader worker, or `fer-dist inspect`, never loads FFmpeg's libraries for the packer's
    sake. Checked in a fresh interpreter, as a loader worker started by spawn is."""
    modules = [
        f"fer_dist.data.{sub}.{p.stem}"
        for sub in ("shards", "stream")
        for p in sorted((REPO / "fer_dist" / "data" / sub).glob("*.py"))
        if p.stem != "__init__"
    ]
    probe = f"import sys, {', '.join(modules)}; print(sorted({{'av', 'torchaudio'}} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", f"{loaded.strip()} loaded by importing {modules}"


def test_no_module_is_named_like_a_standard_library_module():
    """`fer_dist/data/inspect.py` once shadowed the standard library's `inspect` for anything that
    ran with that folder on its path (a script next to it, a debugger): a module's name is its own."""
    clashes = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "fer_dist").rglob("*.py") if p.stem in sys.stdlib_module_names
    )
    assert not clashes, clashes


def package_trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for p in sorted((REPO / "fer_dist").rglob("*.py"))}


def test_no_function_is_longer_than_80_lines():
    """A function reads on one screen: one that grows past it is split by what it does."""
    long = [
        f"{p.relative_to(REPO)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p, tree in package_trees().items()
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.end_lineno - n.lineno + 1 > 80
    ]
    assert not long, long


# The names of a run folder (engine/rundir.py) and of a shard folder (data/shards/format.py):
# joined onto a path anywhere else, they would be a second place that knows the layout.
RUN_FOLDER_NAMES = {
    "config.yaml", "metrics.jsonl", "metrics.json", "checkpoints", "best", "predictions", "confusion",
    "postprocess.json", "provenance.json", "requeue.json", "trackers.json", "tensorboard", "summary.json",
    "report.json", "report.md", "validation.npz", "test.npz", "submission", "ensemble", "model.safetensors",
    "optimizer.pt", "scheduler.pt", "scaler.pt", "state.json", "deepspeed", "manifest.json",
}  # fmt: skip
CONTRACTS = {REPO / "fer_dist" / "engine" / "rundir.py", REPO / "fer_dist" / "data" / "shards" / "format.py"}


def constant(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def contract_breaches(tree: ast.Module) -> list[str]:
    """Where a module joins a run or shard folder's name onto a path, or builds or parses a fold's
    name (`f"fold{k}"`, `"fold" + ...`, `.startswith("fold")`, `.removeprefix("fold")`)."""
    found = []
    for n in ast.walk(tree):
        joined = isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)
        if joined and constant(n.right) in RUN_FOLDER_NAMES:
            found.append(f"line {n.lineno}: / {constant(n.right)!r}")
        if joined and isinstance(n.right, ast.JoinedStr):
            head = constant(n.right.values[0]) or ""
            if head.startswith(("epoch", "step-", "rng-rank")):
                found.append(f"line {n.lineno}: / f{head!r}...")
        if isinstance(n, ast.JoinedStr) and len(n.values) > 1 and (constant(n.values[0]) or "").endswith("fold"):
            found.append(f"line {n.lineno}: f'...fold{{...}}'")
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add) and constant(n.left) == "fold":
            found.append(f"line {n.lineno}: 'fold' + ...")
        parses = isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        if parses and n.func.attr in ("startswith", "removeprefix") and "fold" in map(constant, n.args):
            found.append(f"line {n.lineno}: .{n.func.attr}('fold')")
    return found


def test_run_and_shard_folder_names_and_fold_names_are_made_only_by_their_contracts():
    breaches = {
        str(p.relative_to(REPO)): found
        for p, tree in package_trees().items()
        if p not in CONTRACTS and (found := contract_breaches(tree))
    }
    assert not breaches, breaches
    # the check itself finds each kind it looks for
    planted = 'run / "checkpoints"; run / f"epoch{e:03d}.npz"; f"fold{k}"; "fold" + k; g.startswith("fold")'
    assert len(contract_breaches(ast.parse(planted))) == 5

"""The container image (Dockerfile, .dockerignore), tested without a Docker engine.

There is no Docker daemon on the development and CI machines, so the build stage is replayed
here step by step: the build context is the repository filtered by .dockerignore, the build
stage's COPY instructions lay it out, and its ``pip wheel`` command (the same command string,
only ``pip`` and the output directory substituted) builds the wheel. The wheel must carry the
compiled ledger and the TUI's package data under the project's own import names
(``zaiproxy._native``, ``zaiproxy_tui``; no top-level ``_native`` or ``tui``), and must run
from a fresh virtual environment.
The runtime stage is checked as text (instructions, user, health check) and its HEALTHCHECK
command is run against a real proxy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.harness import REPO, start_process
from zaiproxy import __version__
from zaiproxy.core.config import ConfigError, load_config

# Run once, with h11: `make test`'s second run (h11-mypyc) is for what parses HTTP.
pytestmark = pytest.mark.skipif(os.environ.get("ZAIPROXY_HTTP_IMPL") == "h11-mypyc",
                                reason="the image's build and layout do not depend on the HTTP parser")

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


# ---- a Dockerfile reader (the subset of the syntax the Dockerfile uses) ------------------


@dataclass(frozen=True)
class Instruction:
    stage: str  # the stage's AS name
    name: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD/RUN, else None."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    # Docker joins lines ending in a backslash and drops comment lines, also inside a
    # continued instruction.
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    out: list[Instruction] = []
    stage = ""
    for line in logical:
        name, _, args = line.partition(" ")
        name = name.upper()
        if name == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            stage = m.group(2) if m else f"#{len({i.stage for i in out})}"
        out.append(Instruction(stage, name, args.strip()))
    return out


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV of a stage (``ENV K=V K2=V2`` form only)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.name == "ENV":
            for item in shlex.split(ins.args):
                key, sep, value = item.partition("=")
                assert sep, f"ENV without '=' (legacy form) is not used here: {ins.args}"
                env[key] = value
    return env


def healthcheck_options(args: str) -> tuple[dict[str, str], list[str]]:
    """``--interval=30s ... CMD [...]`` -> options and the exec-form command."""
    head, sep, cmd = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    options = dict(opt.lstrip("-").split("=", 1) for opt in head.split())
    command = json.loads(cmd)
    return options, command


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    out: dict[str, list[Instruction]] = {}
    for ins in instructions:
        out.setdefault(ins.stage, []).append(ins)
    return out


def runtime_stage(instructions: list[Instruction]) -> list[Instruction]:
    return list(stages(instructions).values())[-1]


def build_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The stage the runtime stage copies the wheel from (COPY --from=NAME)."""
    froms = [re.search(r"--from=(\S+)", i.args) for i in runtime_stage(instructions)
             if i.name == "COPY"]
    names = {m.group(1) for m in froms if m}
    assert len(names) == 1, f"the runtime stage copies from {names or 'no stage'}"
    return stages(instructions)[names.pop()]


# ---- .dockerignore (Docker's rules: Go filepath.Match per pattern, ** across dirs) ---------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's matcher: the last matching rule wins; a pattern that matches a parent
    directory matches everything under it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def build_context(dest: Path) -> Path:
    """Copy the repository into ``dest`` as Docker would send it (minus .dockerignore)."""
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    assert not any(neg for neg, _ in rules), "exceptions (!) would need a finer walk here"
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO)
        dirs[:] = [d for d in dirs if not ignored((rel_root / d).as_posix(), rules)]
        for name in files:
            rel = (rel_root / name).as_posix()
            if not ignored(rel, rules):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dest / rel)
    return dest


# ---- the Dockerfile as text ----------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_a_compiler_only_in_the_build_stage(dockerfile):
    froms = [i.args for i in dockerfile if i.name == "FROM"]
    assert len(froms) >= 2, froms
    assert all(re.fullmatch(r"python:3\.11-slim\S* AS \S+", f, re.IGNORECASE) for f in froms), froms
    build = build_stage(dockerfile)
    runtime = runtime_stage(dockerfile)
    assert build is not runtime
    assert any(i.name == "RUN" and re.search(r"apt-get install .*\bgcc\b", i.args) for i in build)
    assert not any(i.name == "RUN" and "gcc" in i.args for i in runtime)
    # The runtime stage takes the wheel, never the sources (they would shadow the install).
    copies = [i.args for i in runtime if i.name in ("COPY", "ADD")]
    assert copies and all(c.startswith("--from=") for c in copies), copies
    installs = [i.args for i in runtime if i.name == "RUN" and "pip install" in i.args]
    assert len(installs) == 1 and re.search(r"pip install \S*zaiproxy-\*\.whl", installs[0])
    # The build fails if the ledger does not load.
    assert "import zaiproxy._native._ledger" in installs[0]


def test_runtime_stage_instructions(dockerfile):
    runtime = runtime_stage(dockerfile)

    def single(name: str) -> Instruction:
        found = [i for i in runtime if i.name == name]
        assert len(found) == 1, f"{name}: {found}"
        return found[0]

    user = single("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid: {user}"
    assert not gid or (gid.isdigit() and int(gid) != 0), user
    assert re.search(rf"useradd .*--uid {uid}\b", " ".join(i.args for i in runtime))
    assert single("EXPOSE").args.split() == ["8080"]
    assert single("STOPSIGNAL").args == "SIGTERM"
    assert single("ENTRYPOINT").exec_form() == ["zaiproxy"]
    assert single("CMD").exec_form() == ["serve"]
    options, command = healthcheck_options(single("HEALTHCHECK").args)
    assert command[:2] == ["python", "-c"] and "/health" in command[2], command
    assert "curl" not in single("HEALTHCHECK").args  # not in the slim image
    assert {"interval", "timeout", "start-period", "retries"} <= options.keys(), options
    # The probe's own urlopen timeout must end before Docker's, or Docker kills it first.
    urlopen_timeout = float(re.search(r"timeout=(\d+(?:\.\d+)?)\)", command[2]).group(1))
    assert urlopen_timeout < float(options["timeout"].rstrip("s"))


def test_runtime_env_is_a_valid_config_with_state_on_the_volume(dockerfile):
    runtime = runtime_stage(dockerfile)
    env = env_of(runtime)
    assert env["ZAIPROXY_HOST"] == "0.0.0.0"
    volumes = [v for i in runtime if i.name == "VOLUME" for v in json.loads(i.args)]
    assert volumes == ["/var/lib/zaiproxy"], volumes
    config, _ = load_config(env={**env, "ZAI_API_KEY": "k" * 32})
    for path in (config.history_path, config.state_file):
        assert path is not None and Path(path).parent == Path(volumes[0]), path
    # The uid owns the volume's directory (created in the image, before USER switches).
    uid = next(i.args for i in runtime if i.name == "USER").split(":")[0]
    assert re.search(rf"install -d -o {uid} -g \d+ .*{re.escape(volumes[0])}",
                     " ".join(i.args for i in runtime if i.name == "RUN"))


def test_build_requirements_match_pyproject(dockerfile):
    """The build stage installs [build-system] requires itself (pip wheel runs with
    --no-build-isolation), so the two lists must not drift apart."""
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    installs = [shlex.split(i.args) for i in build_stage(dockerfile)
                if i.name == "RUN" and i.args.startswith("pip install")]
    assert len(installs) == 1, installs
    assert sorted(installs[0][2:]) == sorted(wanted)


def test_dockerignore_keeps_the_sources_and_drops_local_artefacts(dockerfile):
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    kept = ["pyproject.toml", "setup.py", "README.md", "_native/_ledger.pyx", "_native/_atomic.h",
            "_native/_ledger.pyi", "zaiproxy/cli.py", "zaiproxy/mock/server.py", "tui/tui.tcss"]
    dropped = [".venv/bin/python", ".git/HEAD", "build/lib/x.py", "zaiproxy.egg-info/PKG-INFO",
               "_native/_ledger.cpython-311-x86_64-linux-gnu.so", "_native/_ledger.c",
               "zaiproxy/__pycache__/cli.cpython-311.pyc", "zaiproxy-history.duckdb",
               "zaiproxy-history.duckdb.wal", "bench/results/run1/x.json", ".pytest_cache/x",
               ".hypothesis/examples/x", "tests/test_k8s.py", "k8s/base/kustomization.yaml",
               "typecheck/README.md", "build/cython/_native/_ledger.c"]
    assert [p for p in kept if ignored(p, rules)] == []
    assert [p for p in dropped if not ignored(p, rules)] == []
    # Everything the build stage COPYs from the context is kept.
    for ins in build_stage(dockerfile):
        if ins.name == "COPY":
            for src in shlex.split(ins.args)[:-1]:
                assert not ignored(src.rstrip("/"), rules), src


# ---- the build stage, replayed -----------------------------------------------------------


def replay_build_stage(build: list[Instruction], context: Path, root: Path) -> Path:
    """Run the build stage's steps with ``root`` as the container's filesystem root; return
    the wheel directory. Build tools come from the running interpreter (checked to satisfy
    the stage's own ``pip install`` line); apt-get is skipped (gcc is on this machine)."""
    workdir = root
    wheel_dir: Path | None = None
    for ins in build:
        if ins.name == "WORKDIR":
            workdir = root / ins.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.name == "COPY":
            *sources, dest = shlex.split(ins.args)
            assert not dest.startswith("/"), f"relative COPY destinations only: {ins.args}"
            for src in sources:
                target = workdir / dest
                if (context / src).is_dir():
                    shutil.copytree(context / src, target, dirs_exist_ok=True)
                else:
                    assert dest.endswith("/"), ins.args
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(context / src, target / Path(src).name)
        elif ins.name == "RUN" and ins.args.startswith("apt-get update"):
            assert shutil.which("gcc"), "the build stage needs gcc"
        elif ins.name == "RUN" and ins.args.startswith("pip install"):
            from importlib.metadata import version

            for req in map(Requirement, shlex.split(ins.args)[2:]):
                assert req.specifier.contains(version(req.name), prereleases=True), req
        elif ins.name == "RUN" and ins.args.startswith("pip wheel"):
            argv = shlex.split(ins.args)
            out = argv[argv.index("--wheel-dir") + 1]
            assert "--no-deps" in argv and out.startswith("/"), argv
            wheel_dir = root / out.lstrip("/")
            argv[argv.index("--wheel-dir") + 1] = str(wheel_dir)
            subprocess.run([sys.executable, "-m", *argv], cwd=workdir, check=True,
                           capture_output=True, env={**os.environ, "PIP_NO_INDEX": "1"})
        elif ins.name in ("RUN", "ADD"):
            pytest.fail(f"a build step this test does not replay yet: {ins.name} {ins.args}")
    assert wheel_dir is not None, "the build stage has no `pip wheel` step"
    return wheel_dir


def test_wheel_built_like_the_image_installs_and_runs(dockerfile, tmp_path):
    """~20 s: Cython + gcc -O2 of the ledger, then a fresh venv and four commands in it
    (measured: 15-24 s in all).

    The one wheel build of the suite: it also checks the import names the distribution
    installs (only ``zaiproxy`` and ``zaiproxy_tui``; the folders ``_native/`` and ``tui/`` of
    the repository are mapped under them), from the wheel and from the venv it goes into."""
    context = build_context(tmp_path / "context")
    wheel_dir = replay_build_stage(build_stage(dockerfile), context, tmp_path / "root")

    wheels = list(wheel_dir.glob("zaiproxy-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "zaiproxy = zaiproxy.cli:main" in whl.read(entry_points).decode()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert whl.read(top_level).decode().split() == ["zaiproxy", "zaiproxy_tui"]
    assert [n for n in names if re.fullmatch(r"zaiproxy/_native/_ledger\..*\.so", n)], names
    assert {"zaiproxy_tui/tui.tcss", "zaiproxy_tui/__main__.py", "zaiproxy_tui/widgets/panels.py",
            "zaiproxy/_native/_ledger.pyi", "zaiproxy/_native/_ledger_py.py",
            "zaiproxy/_native/py.typed", "zaiproxy/cli.py", "zaiproxy/mock/server.py",
            "zaiproxy/observe/recorder/__init__.py"} <= set(names)
    # No generic top-level names (tui, _native, tests, bench, ...): only the project's own.
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"zaiproxy", "zaiproxy_tui"}, top
    # The generated C (2 MB) is a build artefact, not package data.
    assert not [n for n in names if n.endswith(".c")], names

    # A fresh venv that sees the project's dependencies through a .pth file (no index, no
    # download), with the wheel installed into it; the repository is not on its path.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site, platsite = map(Path, subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib')); "
                       "print(sysconfig.get_path('platlib'))"],
        check=True, capture_output=True, text=True).stdout.split())
    outer = [p for p in sys.path if p.endswith("site-packages")]
    (site / "_project_deps.pth").write_text("\n".join(outer) + "\n")
    # --ignore-installed: the project's own editable install is visible through the .pth;
    # it must be neither taken as "already satisfied" nor touched.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "--no-index", "--ignore-installed", str(wheels[0])],
                   check=True, capture_output=True)

    clean_env = {k: v for k, v in os.environ.items()
                 if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("ZAIPROXY_")}
    version = subprocess.run([venv / "bin" / "zaiproxy", "version"], cwd=tmp_path,
                             env=clean_env, check=True, capture_output=True, text=True).stdout
    assert version.startswith(f"zaiproxy {__version__} (ledger: native,"), version
    probe = subprocess.run(
        [python, "-c", "import importlib.resources as r, importlib.util as u; "
                       "import zaiproxy._native._ledger, zaiproxy, zaiproxy_tui; "
                       "print(zaiproxy._native._ledger.__file__); print(zaiproxy.__file__); "
                       "print(zaiproxy_tui.__file__); "
                       "print(r.files('zaiproxy_tui').joinpath('tui.tcss').is_file()); "
                       "print(u.find_spec('tui'), u.find_spec('_native'))"],
        cwd=tmp_path, env=clean_env, check=True, capture_output=True, text=True).stdout.split()
    # The wheel's, not the repository's.
    assert all(p.startswith((str(site), str(platsite))) for p in probe[:3]), probe
    assert probe[0].endswith(".so") and probe[3] == "True", probe
    assert probe[4:] == ["None", "None"], probe  # no `tui` or `_native` anywhere on the path
    installed = {p.name for d in (site, platsite) for p in d.iterdir()
                 if not p.name.endswith(".dist-info")}
    assert installed == {"_project_deps.pth", "zaiproxy", "zaiproxy_tui"}, installed
    # `zaiproxy tui` exec's `python -m zaiproxy_tui`: the installed TUI, found by its own name.
    tui = subprocess.run([venv / "bin" / "zaiproxy", "tui", "--help"], cwd=tmp_path,
                         env=clean_env, check=True, capture_output=True, text=True).stdout
    assert tui.startswith("usage: zaiproxy tui"), tui


# ---- the HEALTHCHECK against a real proxy ------------------------------------------------


def run_healthcheck(dockerfile: list[Instruction], port: int) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK command exactly as written; `python` is the image's interpreter,
    the port comes in through the proxy's own variable, as in a container started with
    ZAIPROXY_PORT set."""
    _, command = healthcheck_options(
        next(i for i in runtime_stage(dockerfile) if i.name == "HEALTHCHECK").args)
    assert command[0] == "python"
    env = {k: v for k, v in os.environ.items() if k not in ("ZAIPROXY_PORT", "PORT")}
    return subprocess.run([sys.executable, *command[1:]], env={**env, "ZAIPROXY_PORT": str(port)},
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_passes_against_a_running_proxy_and_fails_without_one(dockerfile, tmp_path):
    server = start_process(["serve", "--demo", "--port", "0", "--workers", "1"], env=None,
                           stderr_path=tmp_path / "proxy.log")
    try:
        ok = run_healthcheck(dockerfile, server.port)
        assert ok.returncode == 0, ok.stderr
    finally:
        assert server.stop() == 0
    down = run_healthcheck(dockerfile, server.port)
    # Docker reads 1 as unhealthy (any other non-zero code is reserved).
    assert down.returncode == 1, (down.returncode, down.stderr)
    assert "Connection refused" in down.stderr or "URLError" in down.stderr


def test_config_rejects_a_container_env_without_the_api_key(dockerfile):
    """The image ships no key: without ZAI_API_KEY (the Secret) `serve` refuses to start."""
    with pytest.raises(ConfigError, match="ZAI_API_KEY"):
        load_config(env=env_of(runtime_stage(dockerfile)))

"""No Docker engine here: check the Dockerfile's structure and that it installs like CI does."""

import json
import re

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def instructions():
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def stages():
    """{stage name: [(keyword, rest), ...]} in order, the FROM line first."""
    out, name = {}, None
    for kw, rest in instructions():
        if kw == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            out[name] = []
        if name is not None:
            out[name].append((kw, rest))
    return out


def extra_requirements(extra: str) -> list[str]:
    """The requirements of a pyproject extra, self-references (glomscan[x]) expanded."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    out = []
    for requirement in extras[extra]:
        match = re.fullmatch(r"glomscan\[([a-z,]+)\]", requirement)
        out += [r for e in match.group(1).split(",") for r in extra_requirements(e)] if match else [requirement]
    return out


def test_targets_on_a_debian_12_slim_base_gpu_by_default():
    ins = instructions()
    args = {k.split("=")[0]: k.split("=", 1)[1] for kw, k in ins if kw == "ARG" and "=" in k}
    assert args["DEBIAN_IMAGE"] == "debian:12-slim"
    named = stages()
    assert list(named) == ["base", "cpu", "train", "gpu"]  # the last stage is what `docker build .` makes
    assert named["base"][0][1] == "${DEBIAN_IMAGE} AS base"
    for target in ("cpu", "train", "gpu"):
        assert named[target][0][1] == f"base AS {target}"


def test_analysis_images_install_no_torch():
    """The cpu and gpu targets install extras without torch (resolved from pyproject) and fail
    their build if torch got in anyway; the train target pins torch with smp in one command."""
    named = stages()
    for target, extras in (("cpu", {"analysis"}), ("gpu", {"gpu", "cuda"})):
        runs = " ".join(rest for kw, rest in named[target] if kw == "RUN")
        installed = set(re.findall(r"/tmp/src\[([a-z,]+)\]", runs))
        assert installed == extras, installed
        for extra in installed:
            names = [re.split(r"[<>=\[ ;~]", r)[0].lower() for r in extra_requirements(extra)]
            assert "torch" not in names and "torchvision" not in names, (extra, names)
        calls = re.findall(r"install-in-image\.sh(\s+\S+)", runs)
        assert calls and all(c.strip() == "--no-torch" for c in calls), calls  # every install checks for torch
        assert "torch==" not in runs
    assert [r.split("[")[0] for r in extra_requirements("gpu")] == ["onnxruntime-gpu", "cuda-bindings>=12.6,<13",
                                                                      "tensorrt-cu12>=10.0,<11"]
    gpu_runs = " ".join(rest for kw, rest in named["gpu"] if kw == "RUN")
    assert "--extra-index-url \"$TENSORRT_INDEX\"" in gpu_runs  # TensorRT's libraries: pypi.nvidia.com
    train_runs = " ".join(rest for kw, rest in named["train"] if kw == "RUN")
    assert re.search(r"install-in-image\.sh\s+torch==\S+ torchvision==\S+ \"segmentation-models-pytorch", train_runs)
    script = (ROOT / "scripts" / "install-in-image.sh").read_text()
    assert "torch must not be in the analysis image" in script and 'if [ "$no_torch" = 1 ]' in script


def test_entrypoint_user_volume_engine_dir_and_health_check():
    ins = instructions()
    entry = [rest for kw, rest in ins if kw == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["glomscan"]
    for target, lines in stages().items():
        if target != "base":
            users = [rest for kw, rest in lines if kw == "USER"]
            assert users == ["glomscan"] and lines[-1] == ("USER", "glomscan"), target
    base = stages()["base"]
    assert any("useradd" in rest and "--uid 10001" in rest for kw, rest in base if kw == "RUN")
    volumes = [v for kw, rest in ins if kw == "VOLUME" for v in json.loads(rest)]
    assert "/engines" in volumes
    env = " ".join(rest for kw, rest in ins if kw == "ENV")
    assert "GLOMSCAN_ENGINE_DIR=/engines" in env
    health = [rest for kw, rest in ins if kw == "HEALTHCHECK"]
    assert health and json.loads(health[0].removeprefix("CMD ").strip()) == ["glomscan", "--version"]


def test_pip_steps_take_a_proxy_ca_as_a_build_secret():
    """Every target installs through scripts/install-in-image.sh, in a step that mounts the build
    context and the pip_ca secret; the script gives pip the CA and leaves no sources behind."""
    installs = [(kw, rest) for kw, rest in instructions() if kw == "RUN" and "install-in-image.sh" in rest]
    assert len(installs) == 3  # cpu, train, gpu
    for kw, rest in installs:
        assert rest.startswith("--mount=type=secret,id=pip_ca ") and "--mount=type=bind,target=/tmp/context" in rest
    assert not any("pip install" in rest for kw, rest in instructions() if kw == "RUN")  # only through the script
    script = (ROOT / "scripts" / "install-in-image.sh").read_text()
    assert "PIP_CERT=/run/secrets/pip_ca" in script and "rm -rf /tmp/src" in script and 'pip install "$@"' in script
    assert "openslideload" in script and "glomscan --version" in script


def test_the_image_install_script_is_valid_sh():
    import subprocess

    subprocess.run(["sh", "-n", str(ROOT / "scripts" / "install-in-image.sh")], check=True)


def test_installs_like_ci_and_downloads_no_weights():
    text = (ROOT / "Dockerfile").read_text()
    assert "scripts/install-system-deps.sh" in text
    assert "install-system-deps.sh" in (ROOT / "scripts" / "setup.sh").read_text()  # the README's two commands
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "pyvips-binary" not in text
    assert not re.search(r"(wget|curl)\s", text), "no downloads at build time"
    for kw, rest in instructions():
        if kw == "COPY":
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src


def test_dockerignore_keeps_the_context_to_what_the_build_copies():
    """An allowlist: everything is ignored but the files the Dockerfile copies or mounts and
    installs (a checkout's build outputs and venvs can be many GB)."""
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = [l[1:] for l in lines if l.startswith("!")]
    assert set(allowed) == {"pyproject.toml", "README.md", "glomscan", "scripts/install-system-deps.sh",
                            "scripts/install-in-image.sh"}
    text = (ROOT / "Dockerfile").read_text() + (ROOT / "scripts" / "install-in-image.sh").read_text()
    for path in allowed:
        assert (ROOT / path).exists() and path in text, path  # named by the Dockerfile or its install script


def test_browser_system_deps_include_what_playwrights_driver_links():
    """Playwright's bundled node links libatomic.so.1 (ldd), which a minimal Debian 12 lacks: the
    browser tests failed there with 'Connection closed while reading from the driver'."""
    import shutil
    import subprocess

    text = (ROOT / "scripts" / "install-system-deps.sh").read_text()
    for package in ("libatomic1", "libstdc++6", "libgcc-s1"):
        assert package in text, package
    try:
        import playwright
    except ImportError:
        pytest.skip("playwright is not installed (the browser tests' extra)")
    node = Path(playwright.__file__).parent / "driver" / "node"
    if not node.is_file() or shutil.which("ldd") is None:
        pytest.skip("no bundled node driver or no ldd here")
    linked = subprocess.run(["ldd", str(node)], capture_output=True, text=True).stdout
    needed = {line.split()[0] for line in linked.splitlines() if "=>" in line}
    covered = {"libatomic.so.1", "libstdc++.so.6", "libgcc_s.so.1", "libc.so.6", "libm.so.6", "libdl.so.2",
               "libpthread.so.0"}
    assert needed <= covered, f"the driver links {sorted(needed - covered)}: add their packages"

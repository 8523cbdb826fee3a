"""``make lab``: JupyterLab for editing the chapters, on 127.0.0.1, in ``notebooks/``, with the project's kernel.

* The server listens on 127.0.0.1 only, on ``--port`` (default 8888, or a free port when that one is taken),
  with a fresh token; the URL to open, token included, is printed before the server starts.
* ``notebooks/*.py`` open as notebooks on a double click (jupytext's JupyterLab extension, made the default
  viewer of Python files by ``tools/jupyterlab/overrides.json``); saving writes the ``.py`` and its paired
  ``.ipynb`` (gitignored) as ``jupytext.toml`` says.
* The kernel is the environment's ``python3`` kernel (``make env`` installs it into ``.venv``), found before any
  user-level kernel of the same name, and it imports ``qklib`` from this checkout.
* Charts are drawn offline: vega, vega-lite and vega-embed for the installed altair (from vl-convert) are
  written once to ``_build/lab/`` and served by JupyterLab at ``/static/``; the kernels find the URL in
  ``$QKLIB_VEGA_SCRIPT`` (see ``qklib.present.vega``).
* As root, JupyterLab refuses to start without ``--allow-root``; it is added then.

Arguments after ``--`` go to JupyterLab unchanged (e.g. ``-- --ServerApp.open_browser=False``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import secrets
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SETTINGS = ROOT / "tools" / "jupyterlab"
STATIC = ROOT / "_build" / "lab"
HOST = "127.0.0.1"


def vega_script(folder: Path = STATIC) -> Path:
    """One classic script with vega, vega-lite and vega-embed for the installed altair, setting
    ``window.vega``, ``window.vegaLite`` and ``window.vegaEmbed`` (the bundle's own top-level names kept in a
    function scope); written once per altair version, offline (vl-convert ships the bundle)."""
    path = folder / f"qklib-vega-altair-{importlib.metadata.version('altair')}.js"
    if path.is_file():
        return path
    import vl_convert  # imported only when the script must be written: both take seconds to import
    from altair.vegalite.v6 import display

    minor = ".".join(display.VEGALITE_VERSION.split(".")[:2])
    bundle = vl_convert.javascript_bundle(vl_version=minor)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(f"/* vega, vega-lite {minor}, vega-embed: vl-convert's javascript_bundle() */\n"
                       f"(function () {{\n{bundle}\n}})();\n")
    partial.replace(path)
    return path


def free_port(preferred: int) -> int:
    """``preferred`` when nothing listens on it on 127.0.0.1, else a port the system picks."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError(f"no free port on {HOST}")


def environment(base: dict[str, str], token: str, script: str = "") -> dict[str, str]:
    """The server's (and so the kernel's) environment: the token (not on the command line, where any user
    could read it), this checkout's ``qklib`` first on the path, the environment's own kernels and
    extensions found before user-level ones, and the URL of the served vega ``script``."""
    env = dict(base, JUPYTER_TOKEN=token, QKLIB_VEGA_SCRIPT=script)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH", "")]))
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(Path(sys.prefix) / "share" / "jupyter"),
                                                        base.get("JUPYTER_PATH", "")]))
    return env


def command(port: int, browser: bool, extra: list[str]) -> list[str]:
    args = [sys.executable, "-m", "jupyterlab", f"--ServerApp.ip={HOST}", f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0", f"--ServerApp.root_dir={NOTEBOOKS}",
            f"--LabApp.app_settings_dir={SETTINGS}", f"--ServerApp.open_browser={browser}",
            f"--ServerApp.extra_static_paths={[str(STATIC)]}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    return args + extra


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8888, help="port on 127.0.0.1 (a free one when taken; 0: any)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a web browser")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    script = vega_script()
    port = free_port(args.port)
    token = secrets.token_hex(24)
    url = f"http://{HOST}:{port}/lab"
    print(f"JupyterLab on the chapters in {NOTEBOOKS.relative_to(ROOT)}/ (Ctrl+C twice to stop):\n"
          f"    {url}?token={token}\n"
          f"    {url}/tree/s5_modes.py?token={token}   (a chapter, opened as a notebook)", flush=True)
    os.execve(sys.executable, command(port, not args.no_browser, extra), environment(os.environ, token, f"/static/{script.name}"))


if __name__ == "__main__":
    main()

"""module.nix and nix/package.nix as they land on a machine, without nixpkgs.

evaluate_module() runs the structural check (tests/nix/module-harness.nix: module.nix
with the lib stand-in). lay_out_package() runs nix/package.nix's own install phase on
its own file set (read through tests/nix/package-layout.nix), with a makeWrapper that
refuses what it does not know. Used by the module, package-layout and daemon-mode tests.
"""
import json
import shlex
import shutil
import subprocess
from pathlib import Path

from support import REPO, nix_env

HARNESS = REPO / "tests" / "nix" / "module-harness.nix"
PACKAGE_LAYOUT = REPO / "tests" / "nix" / "package-layout.nix"

# The parts of stdenv and makeWrapper that nix/package.nix's install phase uses.
INSTALL_PRELUDE = r"""
set -euo pipefail
runHook() { :; }
makeWrapper() {
    local executable=$1 wrapper=$2 flags=""
    shift 2
    if [ ! -x "$executable" ]; then
        echo "Cannot wrap '$executable' because it is not an executable file" >&2
        return 1
    fi
    {
        echo '#!/bin/bash -e'
        while [ "$#" -gt 0 ]; do
            case $1 in
                --set) printf 'export %s=%q\n' "$2" "$3"; shift 3 ;;
                --set-default) printf 'export %s=${%s-%q}\n' "$2" "$2" "$3"; shift 3 ;;
                --prefix) printf 'export %s=%q${%s:+%q}${%s-}\n' "$2" "$4" "$2" "$3" "$2"; shift 4 ;;
                --suffix) printf 'export %s=${%s-}${%s:+%q}%q\n' "$2" "$2" "$2" "$3" "$4"; shift 4 ;;
                --add-flags) flags="$flags $2"; shift 2 ;;
                *) echo "makeWrapper stand-in: unsupported option $1" >&2; return 1 ;;
            esac
        done
        printf 'exec %q%s "$@"\n' "$executable" "$flags"
    } > "$wrapper"
    chmod +x "$wrapper"
}
"""


def evaluate_module(configuration, quote_always=False):
    """The harness's JSON for `configuration` (a Nix attribute-set body), or CalledProcessError."""
    # --read-write-mode: the harness writes the scripts it stands in for into the store.
    command = ["nix-instantiate", "--eval", "--read-write-mode", "--strict", "--json", str(HARNESS),
               "--arg", "configuration", "{" + configuration + "}"]
    if quote_always:
        command += ["--arg", "quoteAlways", "true"]
    completed = subprocess.run(command, env=nix_env(), capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


def package_definition(python):
    """nix/package.nix's {root, files, installPhase}, with `python` as its Python."""
    completed = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", str(PACKAGE_LAYOUT),
         "--argstr", "python", str(python), "--argstr", "nixBin", str(Path(shutil.which("nix-build")).parent)],
        env=nix_env(), capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


def lay_out_package(directory, python):
    """Copy the package's file set to directory/src, run its install phase there; return $out."""
    definition = package_definition(python)
    source = Path(directory) / "src"
    out = Path(directory) / "out"
    for file in map(Path, definition["files"]):
        target = source / file.relative_to(definition["root"])
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.is_dir():
            shutil.copytree(file, target)
        else:
            shutil.copy2(file, target)
    subprocess.run(["bash", "-c", INSTALL_PRELUDE + definition["installPhase"]], cwd=source,
                   env={"PATH": "/usr/bin:/bin", "out": str(out)}, check=True, capture_output=True, text=True)
    return out


def write_shell_script(directory, name, text):
    """A script as pkgs.writeShellScript makes it: bash, then the text."""
    script = Path(directory) / name
    script.write_text("#!/bin/bash\n" + text)
    script.chmod(0o755)
    return script


def module_scripts(evaluated):
    """{"post-build-hook", "diff-hook", "flush"}: the texts of the scripts module.nix writes."""
    settings = evaluated["config"]["nix"]["settings"]
    flush = evaluated["config"]["systemd"]["services"]["hash-collection-flush"]["serviceConfig"]["ExecStart"]
    return {"post-build-hook": settings["post-build-hook"]["text"], "diff-hook": settings["diff-hook"]["text"],
            "flush": Path(flush).read_text()}


def in_private_mounts(binds, command, read_only=()):
    """`command` in a private mount namespace where each target of `binds` {target: source}
    shows its source instead (targets in `read_only` read-only); the machine's own stay untouched."""
    script = ["set -e"]
    for target, source in binds.items():
        script.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
        if target in read_only:
            script.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
    script.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "bash", "-c", "\n".join(script), "bash", *command]

"""Assemble the final image's root filesystem: the interpreter, its standard library, the shared libraries
they load, the relay's virtual environment, and the few files of /etc that glibc and OpenSSL read.

Usage (in the Dockerfile's builder stage, with the base image's python3): rootfs.py VENV DEST

Rules:
- Only what the relay can need at run time. The standard library is copied whole except the packages
  and extension modules listed in SKIP (tests, IDLE, Tk, the installers, sqlite, curses, readline...):
  a module the relay imports lazily on some error path is still there, and the engine test exercises
  TCP, UDP, Unix sockets, TLS, metrics, reload and `relay check` in the built image, so a module missing
  from this list fails the test, not a user.
- Shared libraries are found with ldd from every ELF file copied (interpreter, lib-dynload, the venv's
  extensions), plus libgcc_s, which glibc dlopens when a thread exits (ldd cannot see it).
- Paths keep their symlinks (merged /usr: /lib -> usr/lib; /usr/bin/python3 -> python3.11), so the
  venv's `home` and every RPATH stay valid; the root holds no shell, no package manager and no pip.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import sysconfig
from pathlib import Path

# Top-level names under the standard library that the relay never imports (packages or modules).
SKIP = frozenset(
    {
        "test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "turtle.py",
        "ensurepip",
        "venv",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "sqlite3",
        "dbm",
        "curses",
        "crypt.py",
        "lzma.py",
        "bz2.py",
        "site-packages",
        "dist-packages",
    }
)
# Extension modules (lib-dynload) by their module name, and what they would drag in.
# (nis and _crypt alone bring libnsl, libtirpc and Kerberos; _lzma and _bz2 their compressors.)
SKIP_EXTENSIONS = (
    *("_tkinter", "_sqlite3", "_dbm", "_gdbm", "_curses", "_curses_panel", "readline", "nis", "_crypt"),
    *("_lzma", "_bz2", "ossaudiodev", "audioop", "_test", "_ctypes_test", "_xxtestfuzz", "xxlimited"),
    *("xxsubtype", "_xxsubinterpreters"),
)
PASSWD = "root:x:0:0:root:/root:/usr/sbin/nologin\nrelay:x:10001:10001:relay:/nonexistent:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nrelay:x:10001:\n"


def copy_path(path: str, dest: Path) -> None:
    """Copy `path` into `dest`, recreating every symlink on the way (parents included)."""
    parts = Path(path).parts[1:]
    current = Path("/")
    for index, part in enumerate(parts):
        current = current / part
        target = dest / current.relative_to("/")
        if current.is_symlink():
            if not target.is_symlink():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(os.readlink(current))
            resolved = Path(os.path.normpath(current.parent / os.readlink(current)))
            copy_path(str(resolved.joinpath(*parts[index + 1 :])), dest)
            return
    target = dest / current.relative_to("/")
    if current.is_dir():
        target.mkdir(parents=True, exist_ok=True)
    elif not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(current, target)


def skipped_extension(name: str) -> bool:
    module = name.split(".", 1)[0]
    return any(module == skip or module.startswith(skip + "_") for skip in SKIP_EXTENSIONS)


def copy_stdlib(dest: Path) -> list[Path]:
    """The standard library minus SKIP; returns the extension modules copied (for ldd)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dynload = Path(sysconfig.get_config_var("DESTSHARED"))
    copy_path(str(stdlib), dest)
    ignore = shutil.ignore_patterns("config-*", "__phello__", "*.exe")
    for entry in sorted(stdlib.iterdir()):
        if entry.name in SKIP or entry.name == dynload.name or entry.name.startswith("config-"):
            continue
        target = dest / entry.relative_to("/")
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, ignore=ignore, dirs_exist_ok=True)
        else:
            copy_path(str(entry), dest)
    extensions = []
    for entry in sorted(dynload.iterdir()):
        if entry.suffix == ".so" and not skipped_extension(entry.name):
            copy_path(str(entry), dest)
            extensions.append(entry)
    return extensions


def shared_libraries(elf: Path) -> set[str]:
    """What the dynamic loader maps for `elf` (ldd), the loader itself included."""
    out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False).stdout
    found = set()
    for line in out.splitlines():
        words = line.split()
        if "=>" in words:  # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)"
            resolved = words[words.index("=>") + 1 :][:1]
            if resolved and resolved[0].startswith("/"):
                found.add(resolved[0])
        elif words and words[0].startswith("/"):  # the loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
            found.add(words[0])
    return found


def libgcc_s(libraries: set[str]) -> list[str]:
    """glibc dlopens libgcc_s.so.1 from libc's own folder to unwind an exiting thread."""
    for library in libraries:
        if Path(library).name.startswith("libc.so"):
            candidate = Path(library).parent / "libgcc_s.so.1"
            return [str(candidate)] if candidate.exists() else []
    return []


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    venv, dest = Path(argv[0]), Path(argv[1])
    interpreter = Path(sys.executable)
    shutil.copytree(venv, dest / venv.relative_to("/"), symlinks=True)
    copy_path(str(venv / "bin" / "python"), dest)  # the venv's links, down to the real binary
    elves = [interpreter.resolve(), *copy_stdlib(dest)]
    elves += sorted(venv.rglob("*.so"))
    libraries: set[str] = set()
    for elf in elves:
        libraries |= shared_libraries(elf)
    for library in sorted(libraries) + libgcc_s(libraries):
        copy_path(library, dest)
    # TLS: the CA bundle and OpenSSL's configuration where this build of OpenSSL looks for them.
    paths = ssl.get_default_verify_paths()
    openssl_dir = Path(paths.openssl_cafile).parent
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    for wanted in (paths.openssl_cafile, bundle, str(openssl_dir / "openssl.cnf")):
        if os.path.exists(wanted):
            copy_path(wanted, dest)
    etc = dest / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    nsswitch = Path("/etc/nsswitch.conf")
    # Without it glibc asks DNS before /etc/hosts, where Docker writes host.docker.internal.
    (etc / "nsswitch.conf").write_text(nsswitch.read_text() if nsswitch.exists() else "hosts: files dns\n")
    # socat-style service names as ports (TCP4-LISTEN:www): getservbyname reads it.
    if os.path.exists("/etc/services"):
        copy_path("/etc/services", dest)
    (dest / "tmp").mkdir(mode=0o1777, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    print(f"rootfs: {len(elves)} ELF files, {len(libraries)} shared libraries", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

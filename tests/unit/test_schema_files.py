"""The SQL files ship with the package and form a complete, ordered migration chain."""

from pgnet_curl import schema


def test_migrations_are_numbered_from_one_each_number_once():
    # Numbers are reserved per branch, so a branch may lack one (0004) until the merge.
    versions = [version for version, _, _ in schema.migrations()]
    assert versions[0] == 1
    assert versions == sorted(set(versions))
    assert schema.latest_version() == versions[-1]


def test_each_migration_records_its_version():
    for version, name, text in schema.migrations():
        assert f"insert into net._schema_migrations(version) values ({version})" in text, name


def test_install_script_is_one_locked_transaction():
    script = schema.install_script()
    assert script.startswith(f"-- pgnet-curl schema version {schema.latest_version()}\nbegin;")
    assert "pg_advisory_xact_lock" in script
    assert script.rstrip().endswith("commit;")
    assert "set unlogged" in script and "set logged" not in script
    assert "set logged" in schema.install_script(durable=True)

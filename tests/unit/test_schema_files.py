"""The SQL files ship with the package and form a complete, ordered migration chain."""

from pgnet_curl import schema


def test_migrations_start_at_one_and_versions_increase():
    """Numbers are reserved per branch, so a gap is allowed; an order that is not strict is not."""
    versions = [version for version, _, _ in schema.migrations()]
    assert versions[0] == 1
    assert all(earlier < later for earlier, later in zip(versions, versions[1:])), versions


def test_each_migration_records_its_version():
    for version, name, text in schema.migrations():
        assert f"insert into net._schema_migrations(version) values ({version})" in text, name


def test_install_script_is_one_locked_transaction():
    script = schema.install_script()
    assert script.startswith(f"-- pgnet-curl schema version {schema.latest_version()}\nbegin;")
    assert "pg_advisory_xact_lock" in script
    assert script.rstrip().endswith("commit;")


def test_install_script_creates_logged_tables_and_converts_only_when_asked():
    script = schema.install_script()
    assert "create unlogged" not in script
    assert "set %s', 'logged'" not in script and "set %s', 'unlogged'" not in script, \
        "the default keeps an existing install's mode"
    for table in schema.TABLES:
        assert f"create table if not exists {table}(" in script
        assert f"alter table {table} set %s', 'logged'" in schema.install_script(durable=True)
        assert f"alter table {table} set %s', 'unlogged'" in schema.install_script(durable=False)


def test_every_claim_returns_the_same_columns():
    from pgnet_curl.queue import queries

    def returning(name):
        # The statement's own RETURNING is its last; claim_circuits names its table q.
        return queries()[name].rsplit("returning", 1)[1].replace("q.", "").split()
    assert returning("claim") == returning("claim_overdue") == returning("claim_circuits")
    # The limited claim and the probes come from functions returning those columns, in that order.
    for name in ("claim_limited", "claim_probes"):
        columns = queries()[name].split("\nselect", 1)[1].split("from", 1)[0].replace(",", " ").split()
        assert columns == ["id", "method", "url", "headers", "body", "timeout_milliseconds", "attempts",
                           "created_epoch", "retries", "options", "tableoid"], name
        assert len(columns) == len(" ".join(returning("claim")).split(","))

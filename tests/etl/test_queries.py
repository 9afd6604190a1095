import pytest

from etl.queries import WriteRefused, check_read_only


@pytest.mark.parametrize("query", [
    "INSERT INTO products VALUES ('x', 'y', NULL, NULL, NULL, NULL)",
    "DELETE FROM products",
    "DROP TABLE products",
    "MERGE INTO products t USING products s ON t.product_id = s.product_id WHEN MATCHED THEN DELETE",
    "UPDATE products SET title = 'x'",
    "CREATE TABLE t AS SELECT 1",
    "SELECT 1; DROP TABLE products",
    "SELECT 1 ; DELETE FROM products;",
    "WITH x AS (SELECT 1) INSERT INTO products SELECT * FROM x",
    "  /* hide */ drop table products",
    "SET spark.sql.ansi.enabled=false",
    "INSERT OVERWRITE products SELECT * FROM products",
    "TRUNCATE TABLE quarantine",
    "",
    ";",
])
def test_writes_are_refused(query):
    with pytest.raises(WriteRefused) as err:
        check_read_only(query)
    assert err.value.exit_code == 2


@pytest.mark.parametrize("query", [
    "SELECT * FROM products",
    "select replace(title, 'a', 'b') from products;",
    "SELECT 'drop table products; delete' AS s",
    "SELECT 1 -- ; DROP TABLE products",
    "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
    "SHOW TABLES",
    "DESCRIBE products",
    "SELECT `update` FROM (SELECT 1 AS `update`)",
    "SELECT title FROM products ORDER BY title DESC",
])
def test_queries_pass(query):
    assert check_read_only(query)

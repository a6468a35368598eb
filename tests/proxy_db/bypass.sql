-- Bypass attempts against the Postgres gateway. Each case: `-- name:`, `-- expect: allow|deny`,
-- optional `-- via: simple|extended|both` (default both), then the SQL up to the next
-- `-- name:`. A denied case must leave the database untouched (the test checks that `orders`
-- still has its rows and `customers` its columns). Policy: tests/proxy_db/test_gateway_pg.py.

-- name: multi-statement message hides a DROP after a SELECT
-- expect: deny
-- via: simple
SELECT 1; DROP TABLE orders;

-- name: multi-statement with a transaction around a TRUNCATE
-- expect: deny
-- via: simple
BEGIN; SELECT * FROM orders; TRUNCATE orders; COMMIT;

-- name: data-modifying CTE deletes under a SELECT
-- expect: deny
WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone

-- name: EXPLAIN ANALYZE executes the DELETE it explains
-- expect: deny
EXPLAIN ANALYZE DELETE FROM orders

-- name: DO block runs arbitrary PL/pgSQL
-- expect: deny
DO $$ BEGIN EXECUTE 'DROP TABLE orders'; END $$

-- name: COPY TO PROGRAM runs a shell command
-- expect: deny
COPY orders TO PROGRAM 'cat > /dev/null'

-- name: COPY FROM PROGRAM runs a shell command
-- expect: deny
COPY orders FROM PROGRAM 'echo 1'

-- name: dollar-quoted string that only looks like a DROP
-- expect: allow
SELECT $$; DROP TABLE orders; $$ AS harmless

-- name: tagged dollar quote containing a bare dollar quote
-- expect: allow
SELECT $q$ $$ ; DROP TABLE orders; -- $q$ AS harmless

-- name: line comment does not hide the statement on the next line
-- expect: deny
-- via: simple
SELECT 1 --
; DROP TABLE orders

-- name: block comment hides a DROP (it really is a comment)
-- expect: allow
SELECT 1 /* ; DROP TABLE orders; */

-- name: nested block comments are nested for the server too
-- expect: allow
SELECT 1 /* outer /* inner */ ; DROP TABLE orders; */

-- name: E'' string with an escaped quote keeps the DROP inside the string
-- expect: allow
SELECT E'\'; DROP TABLE orders; --' AS harmless

-- name: backslash in a standard string does not escape the quote
-- expect: deny
-- via: simple
SELECT 'a\'; DROP TABLE orders; --'

-- name: turning standard_conforming_strings off is refused
-- expect: deny
SET standard_conforming_strings = off

-- name: set_config cannot turn standard_conforming_strings off either
-- expect: deny
SELECT set_config('standard_conforming_strings', 'off', false)

-- name: switching client_encoding to a multi-byte encoding is refused
-- expect: deny
SET client_encoding = 'SJIS'

-- name: unicode-escaped identifier still names orders
-- expect: deny
DROP TABLE U&"\006Frders"

-- name: quoted identifier with mixed case
-- expect: deny
TRUNCATE "orders"

-- name: keyword case and whitespace games
-- expect: deny
dRoP	TaBlE
  orders

-- name: schema-qualified drop
-- expect: deny
DROP TABLE public.orders

-- name: PREPARE of a DELETE is a delete
-- expect: deny
PREPARE wipe AS DELETE FROM orders

-- name: PREPARE and EXECUTE in one message
-- expect: deny
-- via: simple
PREPARE wipe2 AS DELETE FROM orders; EXECUTE wipe2

-- name: unbounded DELETE on a writable table
-- expect: deny
DELETE FROM audit_trail

-- name: bounded DELETE on a writable table
-- expect: allow
DELETE FROM audit_trail WHERE id = -1

-- name: UPDATE without WHERE on a writable table
-- expect: deny
UPDATE audit_trail SET note = 'x'

-- name: SET ROLE to a superuser
-- expect: deny
SET ROLE postgres

-- name: reading server files through a function
-- expect: deny
SELECT pg_read_file('/etc/hostname')

-- name: large-object export through a function
-- expect: deny
SELECT lo_export(1, '/tmp/x')

-- name: CREATE FUNCTION to smuggle statements
-- expect: deny
CREATE FUNCTION evil() RETURNS void LANGUAGE sql AS 'DROP TABLE orders'

-- name: INSERT into a table that is not writable
-- expect: deny
INSERT INTO orders (customer_id, amount, status) VALUES (1, 1, 'x')

-- name: INSERT ... SELECT reads and writes
-- expect: allow
INSERT INTO audit_trail (note) SELECT status FROM orders WHERE false

-- name: unparseable text is denied
-- expect: deny
SELEC * FRM orders

-- name: ordinary read
-- expect: allow
SELECT id, status FROM orders ORDER BY id

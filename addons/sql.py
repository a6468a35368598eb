"""SQL statement classification with PostgreSQL's own grammar (libpg_query via pgparse).

(Stage-1 placeholder: only the statement-kind vocabulary; classification lands with proxy_db.)
"""

STATEMENT_KINDS = (
    "select insert update delete merge truncate copy_to copy_from copy_program create alter drop "
    "grant revoke role set show transaction prepare execute deallocate explain call do lock "
    "maintenance listen_notify other"
).split()

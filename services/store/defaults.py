"""Every size, count and timeout of the model store and the host caches, in one place."""

PART_SIZE = 8 << 20             # bytes; one ranged GET / one multipart part; smaller blobs go up in one PUT
TRANSFER_THREADS = 10           # parallel parts of one blob (s3transfer's max_concurrency, ranged GETs)
BLOB_THREADS = 4                # blobs of one model uploaded / fetched at once
RETRIES = 5                     # attempts of one request (botocore "standard" retry mode)
CONNECT_TIMEOUT = 10.0          # s
READ_TIMEOUT = 60.0             # s; a stalled read of a part fails and is retried
STREAM_CHUNK = 1 << 20          # bytes; one read from a response body
HASH_BLOCK = 8 << 20            # bytes; one read back from a partial file while hashing it
CORRUPT_REFETCHES = 1           # a blob that does not hash to its name is fetched again this often
BLOB_PREFIX = "blobs/blake3/"   # under the store's prefix
PROGRESS_INTERVAL = 0.5         # s; at most one fetch progress report this often
GC_GRACE = 6 * 3600.0           # s; `store gc` spares unreferenced blobs this young (an install not yet recorded)
CLAIM_TTL = 24 * 3600.0         # s; an install's claim on a blob (kept until its record): a killed one lapses
DELETE_MARK_TTL = 600.0         # s; a delete's mark on a blob while it decides (a killed delete's lapses)
CLAIM_WAIT = 0.05               # s; how often a claim refused by a delete's mark asks again

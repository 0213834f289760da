"""Every timeout, TTL and limit of the install service and its jobs, in one place.

(``services`` never imports ``workers``, so the job options the service enqueues with live here.)
"""

JOB_TIMEOUT = 6 * 3600          # s; an install job resolves a source; downloads of large models take long
HASH_JOB_TIMEOUT = 2 * 3600     # s; BLAKE3 of a 100 GB folder on a slow disk
JOB_RETRIES = 3                 # RQ retries of a job whose worker died or that hit a transient error
RESULT_TTL = 24 * 3600          # s; RQ keeps a finished job's result this long
FAILURE_TTL = 7 * 24 * 3600
PROGRESS_TTL = 7 * 24 * 3600    # s; the per-job progress hash (bytes per file)
CANCEL_FLAG_TTL = 24 * 3600     # s; the cancel flag outlives any job that could still read it
CANCEL_POLL_INTERVAL = 0.2      # s; how often a running download looks at the cancel flag
PROGRESS_INTERVAL = 0.5         # s; at most one progress report per file this often
WAIT_BLOCK_MS = 500             # blocking read of the log while waiting for a job
STAGING_DIR = ".staging"        # under the models dir: same filesystem, so placing is a rename
MAX_NAME_COLLISIONS = 10_000    # name_1 ... name_N before giving up on a free destination
APPEND_ATTEMPTS = 20            # optimistic appends to one job's log before giving up
IMPORT_DIR = "import"           # under the root: where the CLI and the client hand local sources over

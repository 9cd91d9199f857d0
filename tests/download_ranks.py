"""Each rank of ``paddle.distributed.launch`` fetches the same dataset file through
``utils.io.download.download_dataset`` (run by tests/test_download.py with the URL, its MD5
and the cache's home folder); each rank prints the MD5 of the file it was handed."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

url, md5 = sys.argv[1], sys.argv[2]

from paddle.dataset.common import md5file  # noqa: E402

from utils.io.download import download_dataset  # noqa: E402

path = download_dataset(url, "cifar", md5, "the test archive", "fix: none")
print(f"rank {os.environ.get('PADDLE_TRAINER_ID')} {path} {md5file(path)}", flush=True)

// Upload one file with tus-js-client (Node build) and print one JSON line with the result.
//
//   node -e "$(cat tus_upload.js)" -- ENDPOINT FILE 'OPTIONS_JSON'
//
// OPTIONS_JSON: {"chunkSize": n, "metadata": {...}, "parallelUploads": n,
//                "deferLength": true   (uploadLengthDeferred: the size is declared at the end),
//                "abortAfterChunks": n (abort after n chunks, then resume from the stored URL),
//                "headers": {...}}
// Output: {"ok": true, "url": ..., "resumedFrom": offset|null, "chunks": n} or {"ok": false, "error": ...}
const fs = require('fs');
const tus = require('tus-js-client');

const [endpoint, file, optsJson] = process.argv.slice(1);
const opts = JSON.parse(optsJson || '{}');
const size = fs.statSync(file).size;

function input() {
  // With a deferred length the size is not given to the client; it learns it at the end.
  // (tus-js-client 4.3.1's Node stream source announces a full chunk's Content-Length for a
  // shorter last chunk, which hangs against any server, tusd included: a Buffer is used.)
  return fs.readFileSync(file);
}

function run(uploadUrl, abortAfter) {
  return new Promise((resolve, reject) => {
    let chunks = 0;
    let firstOffset = null;
    const options = {
      endpoint,
      uploadUrl: uploadUrl || null,
      metadata: opts.metadata || {},
      headers: opts.headers || {},
      retryDelays: [0, 200, 500],
      removeFingerprintOnSuccess: true,
      onChunkComplete(chunkSize, bytesAccepted) {
        if (firstOffset === null) firstOffset = bytesAccepted - chunkSize;
        chunks += 1;
        if (abortAfter && chunks >= abortAfter) {
          upload.abort(false).then(() => resolve({ aborted: true, url: upload.url, chunks }));
        }
      },
      onSuccess() { resolve({ aborted: false, url: upload.url, chunks, firstOffset }); },
      onError(err) { reject(err); },
    };
    if (opts.chunkSize) options.chunkSize = opts.chunkSize;
    if (opts.parallelUploads) options.parallelUploads = opts.parallelUploads;
    if (opts.deferLength) options.uploadLengthDeferred = true;
    const upload = new tus.Upload(input(), options);
    upload.start();
  });
}

(async () => {
  try {
    let first = await run(null, opts.abortAfterChunks || 0);
    let resumedFrom = null;
    if (first.aborted) {
      const second = await run(first.url, 0);
      resumedFrom = second.firstOffset;
      first = { ...second, chunks: first.chunks + second.chunks };
    }
    console.log(JSON.stringify({ ok: true, url: first.url, chunks: first.chunks, resumedFrom, size }));
  } catch (err) {
    console.log(JSON.stringify({ ok: false, error: String(err && err.message ? err.message : err) }));
    process.exitCode = 1;
  }
})();

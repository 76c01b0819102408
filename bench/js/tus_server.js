// The reference for bench/tus_bench.py: @tus/server with @tus/file-store, on 127.0.0.1.
//   node tus_server.js PORT FOLDER
const http = require('http');
const { Server } = require('@tus/server');
const { FileStore } = require('@tus/file-store');

const [port, directory] = process.argv.slice(2);
const tus = new Server({ path: '/files', datastore: new FileStore({ directory }) });
const server = http.createServer((req, res) => tus.handle(req, res));
server.listen(Number(port), '127.0.0.1', () => console.log(`@tus/server on ${port}`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));

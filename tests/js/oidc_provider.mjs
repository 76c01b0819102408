// A real OpenID provider (the certified npm package oidc-provider) for the gateway's bearer-token tests.
//
//   node oidc_provider.mjs PORT CLIENTS_JSON
//
// Listens on 127.0.0.1:PORT (issuer http://127.0.0.1:PORT), prints "ready <issuer>" once serving.
// CLIENTS_JSON: [{"client_id": "...", "client_secret": "...", "roles": [...]}]; each may use the
// client_credentials grant, and its access tokens carry "roles" and "preferred_username" claims.
//
// Access tokens are JWTs (resource indicators with accessTokenFormat "jwt"), one resource per case:
//   urn:dicomproxy          aud "dicomproxy", RS256, 10 minutes
//   urn:dicomproxy:es256    aud "dicomproxy", ES256, 10 minutes
//   urn:dicomproxy:short    aud "dicomproxy", RS256, 3 seconds (expiry tests)
//   urn:other               aud "other-api", RS256 (wrong-audience tests)
//
// A line "rotate" on standard input replaces the signing keys by new ones (new kids first, the old
// ones still published, as a real rotation does) and prints "rotated <new RSA kid> <new EC kid>".
import crypto from 'node:crypto';
import http from 'node:http';
import readline from 'node:readline';

import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const clients = JSON.parse(process.argv[3] || '[]');
const issuer = `http://127.0.0.1:${port}`;

const RESOURCES = {
  'urn:dicomproxy': { audience: 'dicomproxy', alg: 'RS256', ttl: 600 },
  'urn:dicomproxy:es256': { audience: 'dicomproxy', alg: 'ES256', ttl: 600 },
  'urn:dicomproxy:short': { audience: 'dicomproxy', alg: 'RS256', ttl: 3 },
  'urn:other': { audience: 'other-api', alg: 'RS256', ttl: 600 },
};

function newKeys() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  return [
    { ...rsa, kid: `rsa-${crypto.randomUUID()}`, alg: 'RS256', use: 'sig' },
    { ...ec, kid: `ec-${crypto.randomUUID()}`, alg: 'ES256', use: 'sig' },
  ];
}

function makeProvider(keys) {
  const provider = new Provider(issuer, {
    clients: clients.map((c) => ({
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      roles: c.roles || [],
    })),
    extraClientMetadata: { properties: ['roles'] },
    jwks: { keys },
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:dicomproxy',
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, indicator) => {
          const r = RESOURCES[indicator];
          if (!r) throw new Provider.errors.InvalidTarget();
          return {
            scope: 'dicom',
            audience: r.audience,
            accessTokenTTL: r.ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: r.alg } },
          };
        },
      },
    },
    extraTokenClaims: (ctx, token) => {
      const client = token.client || ctx.oidc.client;
      return { roles: client?.roles || [], preferred_username: client?.clientId };
    },
  });
  provider.proxy = false;
  return provider;
}

let keys = newKeys();
let provider = makeProvider(keys);
const server = http.createServer((req, res) => provider.callback()(req, res));
server.listen(port, '127.0.0.1', () => console.log(`ready ${issuer}`));

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line.trim() !== 'rotate') return;
  const fresh = newKeys();
  keys = [...fresh, ...keys];
  provider = makeProvider(keys);
  console.log(`rotated ${fresh[0].kid} ${fresh[1].kid}`);
});
process.stdin.on('end', () => process.exit(0));

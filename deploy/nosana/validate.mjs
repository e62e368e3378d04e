// Validate Nosana job definitions with Nosana's own validator (`validateJobDefinition`
// from @nosana/sdk, pinned in package-lock.json): `node validate.mjs FILE...`.
// Prints one JSON line per file ({file, success, errors}); exit 0 iff every file is valid.
import { readFileSync } from 'node:fs';
import { validateJobDefinition } from '@nosana/sdk';

let ok = true;
for (const file of process.argv.slice(2)) {
  let result;
  try {
    result = validateJobDefinition(JSON.parse(readFileSync(file, 'utf8')));
  } catch (err) {
    result = { success: false, errors: [{ path: '$input', expected: 'JSON', value: String(err) }] };
  }
  ok &&= result.success;
  const errors = (result.errors ?? []).map(({ path, expected }) => ({ path, expected }));
  console.log(JSON.stringify({ file, success: result.success, errors }));
}
process.exit(ok && process.argv.length > 2 ? 0 : 1);

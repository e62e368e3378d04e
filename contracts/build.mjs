#!/usr/bin/env node
// Compile contracts/src/*.sol with the pinned solc-js and write one artifact per contract to
// sogni_chain/artifacts/<Name>.json (sorted keys, 2-space indent, trailing newline), so a fresh
// build is byte-identical to the committed one and Python needs no compiler.
//
//   node contracts/build.mjs           write the artifacts
//   node contracts/build.mjs --check   exit 1 if the committed artifacts differ from a fresh build
//   node contracts/build.mjs --out DIR write somewhere else
import { createRequire } from 'node:module'
import * as fs from 'node:fs'
import * as path from 'node:path'
import { fileURLToPath } from 'node:url'

const require = createRequire(import.meta.url)
const solc = require('solc')

const HERE = path.dirname(fileURLToPath(import.meta.url))
const SRC = path.join(HERE, 'src')
const NODE_MODULES = path.join(HERE, 'node_modules')
// Contracts that get an artifact (others compiled from src/ are ignored).
const CONTRACTS = ['SogniToken', 'Staking', 'WorkerLicense', 'RewardDistributor', 'NetworkParameters', 'SogniGovernor', 'SogniTimelock', 'Disputes', 'ModelStake']
const SETTINGS = {
  evmVersion: 'cancun', // py-evm's newest fork is Prague; cancun bytecode runs on both chains
  optimizer: { enabled: true, runs: 200 },
  outputSelection: {
    '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object', 'evm.methodIdentifiers'] },
  },
}

function parseArgs(argv) {
  const opts = { check: false, out: path.join(HERE, '..', 'sogni_chain', 'artifacts') }
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--check') opts.check = true
    else if (argv[i] === '--out') opts.out = path.resolve(argv[++i])
    else throw new Error(`unknown argument ${argv[i]}`)
  }
  return opts
}

// Source unit names are relative ("src/Staking.sol", "@openzeppelin/..."), never absolute,
// because they end up in the metadata hash inside the bytecode.
function findImports(importPath) {
  const candidates = [path.join(HERE, importPath), path.join(NODE_MODULES, importPath)]
  for (const file of candidates) {
    if (fs.existsSync(file)) return { contents: fs.readFileSync(file, 'utf8') }
  }
  return { error: `not found: ${importPath}` }
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys)
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, sortKeys(value[k])]))
  }
  return value
}

function compile() {
  const sources = {}
  for (const file of fs.readdirSync(SRC).filter((f) => f.endsWith('.sol')).sort()) {
    sources[`src/${file}`] = { content: fs.readFileSync(path.join(SRC, file), 'utf8') }
  }
  const input = { language: 'Solidity', sources, settings: SETTINGS }
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }))
  const errors = (output.errors || []).filter((e) => e.severity === 'error')
  for (const e of output.errors || []) console.error(e.formattedMessage)
  if (errors.length) throw new Error(`solc reported ${errors.length} error(s)`)

  const ozVersion = JSON.parse(
    fs.readFileSync(path.join(NODE_MODULES, '@openzeppelin', 'contracts', 'package.json'), 'utf8'),
  ).version
  const artifacts = {}
  for (const name of CONTRACTS) {
    const sourceName = `src/${name}.sol`
    const c = output.contracts?.[sourceName]?.[name]
    if (!c) throw new Error(`no output for ${sourceName}:${name}`)
    const artifact = {
      contractName: name,
      sourceName,
      abi: c.abi,
      bytecode: '0x' + c.evm.bytecode.object,
      deployedBytecode: '0x' + c.evm.deployedBytecode.object,
      methodIdentifiers: c.evm.methodIdentifiers,
      compiler: {
        solc: solc.version(),
        openzeppelin: ozVersion,
        evmVersion: SETTINGS.evmVersion,
        optimizer: SETTINGS.optimizer,
      },
    }
    artifacts[`${name}.json`] = JSON.stringify(sortKeys(artifact), null, 2) + '\n'
  }
  return artifacts
}

function main() {
  const opts = parseArgs(process.argv.slice(2))
  const artifacts = compile()
  if (opts.check) {
    const stale = []
    for (const [file, text] of Object.entries(artifacts)) {
      const target = path.join(opts.out, file)
      if (!fs.existsSync(target) || fs.readFileSync(target, 'utf8') !== text) stale.push(file)
    }
    if (stale.length) {
      console.error(`artifacts differ from a fresh build: ${stale.join(', ')}`)
      console.error('run: node contracts/build.mjs')
      process.exit(1)
    }
    console.log(`artifacts up to date (${Object.keys(artifacts).length} contracts, solc ${solc.version()})`)
    return
  }
  fs.mkdirSync(opts.out, { recursive: true })
  for (const [file, text] of Object.entries(artifacts)) fs.writeFileSync(path.join(opts.out, file), text)
  console.log(`wrote ${Object.keys(artifacts).length} artifacts to ${path.relative(process.cwd(), opts.out) || '.'}`)
}

main()

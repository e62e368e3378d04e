"""Keys and deployments a wallet needs, without a chain client: keystore v3 files and the
addresses file `sogni-coordinator chain deploy` writes. Node, coordinator and client import
this; it imports no web3 and no daemon."""

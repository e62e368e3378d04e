// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";

/// @title SOGNI token
/// @notice Fixed-supply ERC-20 with EIP-2612 permit, so stakers and claimers can approve with a
///         signature instead of a separate approval transaction.
/// @dev The whole supply is minted once to the treasury; there is no mint function afterwards.
contract SogniToken is ERC20, ERC20Permit {
    /// @notice 10 billion SOGNI with 18 decimals.
    uint256 public constant TOTAL_SUPPLY = 10_000_000_000 * 1e18;

    error ZeroAddress();

    constructor(address treasury) ERC20("Sogni", "SOGNI") ERC20Permit("Sogni") {
        if (treasury == address(0)) revert ZeroAddress();
        _mint(treasury, TOTAL_SUPPLY);
    }
}

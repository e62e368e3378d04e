// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";

/// @title The governance timelock: owns NetworkParameters and administers Staking and the
///        RewardDistributor; executes only what the Governor queued, after `getMinDelay()`.
/// @dev A named subclass only so the build writes an artifact for it.
contract SogniTimelock is TimelockController {
    constructor(uint256 minDelay, address[] memory proposers, address[] memory executors, address admin)
        TimelockController(minDelay, proposers, executors, admin)
    {}
}

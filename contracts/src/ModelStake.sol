// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";

/// @title SOGNI staked on models, for visibility
/// @notice Anyone (a model's creator, its fans) stakes SOGNI on a model id, the keccak256 of the
///         model's catalog name; coordinators list models with more stake first. Unstaking
///         stops counting at once and can be withdrawn after `COOLDOWN`, so stake cannot be
///         moved from model to model faster than the lists are read.
/// @dev No admin, no slashing: the stake only ranks. Every change emits the model's new total,
///      so a reader keeps the latest total per model from the events alone.
contract ModelStake {
    using SafeERC20 for IERC20;

    uint256 public constant COOLDOWN = 7 days;

    IERC20 public immutable token;

    struct Pending {
        uint256 amount;
        uint64 unlockAt;
    }

    mapping(bytes32 model => uint256) public totalStake;
    mapping(bytes32 model => mapping(address account => uint256)) public stakeOf;
    mapping(bytes32 model => mapping(address account => Pending)) public pendingOf;

    event ModelStaked(bytes32 indexed model, address indexed account, uint256 amount, uint256 modelTotal);
    event ModelUnstakeRequested(
        bytes32 indexed model, address indexed account, uint256 amount, uint256 modelTotal, uint64 unlockAt
    );
    event ModelWithdrawn(bytes32 indexed model, address indexed account, uint256 amount);

    error ZeroAddress();
    error ZeroAmount();
    error InsufficientStake(uint256 staked, uint256 requested);
    error CooldownActive(uint64 unlockAt);
    error NothingPending();

    constructor(IERC20 token_) {
        if (address(token_) == address(0)) revert ZeroAddress();
        token = token_;
    }

    /// @notice Stake `amount` on `model` (needs a prior approve).
    function stake(bytes32 model, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        token.safeTransferFrom(msg.sender, address(this), amount);
        stakeOf[model][msg.sender] += amount;
        uint256 total = totalStake[model] + amount;
        totalStake[model] = total;
        emit ModelStaked(model, msg.sender, amount, total);
    }

    /// @notice Stop counting `amount` now; withdraw it after the cooldown (a new request
    ///         adds to the pending amount and restarts the cooldown for all of it).
    function requestUnstake(bytes32 model, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 staked = stakeOf[model][msg.sender];
        if (amount > staked) revert InsufficientStake(staked, amount);
        stakeOf[model][msg.sender] = staked - amount;
        uint256 total = totalStake[model] - amount;
        totalStake[model] = total;
        Pending storage p = pendingOf[model][msg.sender];
        p.amount += amount;
        p.unlockAt = uint64(block.timestamp + COOLDOWN);
        emit ModelUnstakeRequested(model, msg.sender, amount, total, p.unlockAt);
    }

    /// @notice Take back what is pending on `model` once its cooldown is over.
    function withdraw(bytes32 model) external {
        Pending memory p = pendingOf[model][msg.sender];
        if (p.amount == 0) revert NothingPending();
        if (block.timestamp < p.unlockAt) revert CooldownActive(p.unlockAt);
        delete pendingOf[model][msg.sender];
        token.safeTransfer(msg.sender, p.amount);
        emit ModelWithdrawn(model, msg.sender, p.amount);
    }
}

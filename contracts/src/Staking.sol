// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";
import {Votes} from "@openzeppelin/contracts/governance/utils/Votes.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";

/// @title SOGNI staking for worker tiers
/// @notice Workers stake SOGNI to qualify for a tier (fast workers need a minimum) and to raise
///         their selection chance. Unstaking moves tokens to a pending bucket that stops counting
///         immediately and can be withdrawn only after a 7-day cooldown, so a worker cannot
///         dodge a slash by unstaking right after misbehaving.
/// @dev Roles: DEFAULT_ADMIN_ROLE is governance (sets tier minimums, may slash, manages roles;
///      one holder, handed over in two steps after `defaultAdminDelay()`); SLASHER_ROLE may slash.
///      `stakeFor` lets anyone (the reward distributor's auto-stake) add stake for an account. Slashed tokens go to `slashRecipient`, never back to the worker.
///      A new unstake request adds to the pending bucket and restarts the cooldown for all of it
///      (never earlier than the bucket's unlock time). A proposed slash freezes withdrawals for
///      the case's course (`freeze`, SLASHER_ROLE: the Disputes contract).
///      Votes: active stake is voting power (OZ `Votes`, timestamp clock) for the Governor. It is
///      checkpointed here and not on the token, so token transfers (claims) pay no vote gas.
///      A first stake delegates the account to itself unless it has chosen a delegate already;
///      an unstake request or a slash of active stake removes the votes at once. When an
///      account's delegate last changed is recorded (`delegationOf`) for Disputes.
contract Staking is AccessControlDefaultAdminRules, Votes {
    using SafeERC20 for IERC20;

    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");
    /// @notice The default unstake cooldown; governance may move it within the bounds below.
    uint256 public constant COOLDOWN = 7 days;
    uint256 public constant MIN_COOLDOWN = 1 days;
    uint256 public constant MAX_COOLDOWN = 30 days;

    IERC20 public immutable token;
    address public slashRecipient;

    /// @dev `pending` and `unlockAt` share a slot: an unstake request writes both. `active`
    ///      and `delegatedAt` share the other: a first stake writes both for one slot's price.
    struct Position {
        uint192 active; // <= the token's supply (10^28) < 2^192
        uint64 delegatedAt; // when the account's delegate last changed (`delegationOf`)
        uint192 pending; // <= the token's supply (10^28) < 2^192
        uint64 unlockAt;
    }

    mapping(address account => Position) private _positions;
    /// @notice Until when `account` may not withdraw: a proposed slash freezes its stake for
    ///         the case's whole course (`freeze`), so unstaking cannot outrun a slow dispute.
    mapping(address account => uint64) public frozenUntil;
    mapping(uint8 tier => uint256) public tierMinimum;
    uint256 public totalPending;
    /// @notice Seconds an unstake request waits before it can be withdrawn.
    uint256 public cooldown = COOLDOWN;

    event Staked(address indexed account, uint256 amount, uint256 activeAfter);
    event UnstakeRequested(address indexed account, uint256 amount, uint256 pendingAfter, uint64 unlockAt);
    event Withdrawn(address indexed account, uint256 amount);
    event Slashed(
        address indexed account, uint256 fromActive, uint256 fromPending, address indexed slasher, string reason
    );
    event TierMinimumSet(uint8 indexed tier, uint256 minimum);
    event SlashRecipientSet(address recipient);
    event CooldownSet(uint256 cooldown);
    event Frozen(address indexed account, uint64 until, address indexed slasher);

    error ZeroAddress();
    error ZeroAmount();
    error InsufficientActiveStake(uint256 requested, uint256 active);
    error NothingToWithdraw();
    error CooldownActive(uint64 unlockAt);
    error NothingToSlash(address account);
    error NotSlasher(address caller);
    error CooldownOutOfBounds(uint256 value, uint256 min, uint256 max);
    error StakeFrozen(uint64 until);

    /// @param adminTransferDelay seconds between `beginDefaultAdminTransfer` and its acceptance.
    constructor(IERC20 token_, address governance, address slashRecipient_, uint48 adminTransferDelay)
        AccessControlDefaultAdminRules(adminTransferDelay, governance)
        EIP712("SogniStaking", "1")
    {
        if (address(token_) == address(0) || slashRecipient_ == address(0)) revert ZeroAddress();
        token = token_;
        slashRecipient = slashRecipient_;
    }

    // ----- staker actions -----

    /// @notice Pull `amount` SOGNI from the caller (needs an allowance) into active stake.
    function stake(uint256 amount) external {
        _stake(msg.sender, amount);
    }

    /// @notice Pull `amount` SOGNI from the caller (needs an allowance) into `account`'s active
    ///         stake. The stake belongs to `account` alone: only it can unstake and withdraw.
    function stakeFor(address account, uint256 amount) external {
        if (account == address(0)) revert ZeroAddress();
        _stake(account, amount);
    }

    function _stake(address account, uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        // Delegate first: `_delegate` moves the units the account already has.
        if (delegates(account) == address(0)) _delegate(account, account);
        Position storage p = _positions[account];
        uint256 active = p.active + amount;
        p.active = uint192(active); // all stake is SOGNI held here: <= supply < 2^192
        emit Staked(account, amount, active);
        _transferVotingUnits(address(0), account, amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Move `amount` from active to pending; it stops counting now, unlocks after COOLDOWN.
    function requestUnstake(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        Position storage p = _positions[msg.sender];
        uint256 active = p.active;
        if (amount > active) revert InsufficientActiveStake(amount, active);
        uint192 pending;
        unchecked {
            p.active = uint192(active - amount);
            pending = p.pending + uint192(amount); // amount <= active <= supply < 2^192
        }
        totalPending += amount;
        _transferVotingUnits(msg.sender, address(0), amount);
        uint64 unlockAt = uint64(block.timestamp + cooldown);
        if (p.unlockAt > unlockAt) unlockAt = p.unlockAt; // a shorter cooldown never pulls it in
        (p.pending, p.unlockAt) = (pending, unlockAt); // one slot
        emit UnstakeRequested(msg.sender, amount, pending, unlockAt);
    }

    /// @notice Withdraw the whole pending bucket once its cooldown is over.
    function withdraw() external returns (uint256 amount) {
        Position storage p = _positions[msg.sender];
        amount = p.pending;
        if (amount == 0) revert NothingToWithdraw();
        if (block.timestamp < p.unlockAt) revert CooldownActive(p.unlockAt);
        uint64 frozen = frozenUntil[msg.sender];
        if (block.timestamp < frozen) revert StakeFrozen(frozen);
        (p.pending, p.unlockAt) = (0, 0); // one slot
        totalPending -= amount;
        emit Withdrawn(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    // ----- governance -----

    /// @notice Set the minimum active stake for `tier` (0 means no minimum).
    function setTierMinimum(uint8 tier, uint256 minimum) external onlyRole(DEFAULT_ADMIN_ROLE) {
        tierMinimum[tier] = minimum;
        emit TierMinimumSet(tier, minimum);
    }

    /// @notice Set the unstake cooldown (bounded: a slash must still be able to catch a leaver).
    /// @dev Applies to later requests; a pending bucket keeps the unlock time it was given.
    function setCooldown(uint256 newCooldown) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (newCooldown < MIN_COOLDOWN || newCooldown > MAX_COOLDOWN) {
            revert CooldownOutOfBounds(newCooldown, MIN_COOLDOWN, MAX_COOLDOWN);
        }
        cooldown = newCooldown;
        emit CooldownSet(newCooldown);
    }

    function setSlashRecipient(address recipient) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (recipient == address(0)) revert ZeroAddress();
        slashRecipient = recipient;
        emit SlashRecipientSet(recipient);
    }

    /// @notice Keep `account` from withdrawing until `until` (a slash was proposed against it:
    ///         `Disputes.proposeSlash`); a later freeze only ever extends an earlier one.
    function freeze(address account, uint64 until) external {
        if (!hasRole(SLASHER_ROLE, msg.sender) && !hasRole(DEFAULT_ADMIN_ROLE, msg.sender)) {
            revert NotSlasher(msg.sender);
        }
        if (until > frozenUntil[account]) frozenUntil[account] = until;
        emit Frozen(account, frozenUntil[account], msg.sender);
    }

    /// @notice Take up to `amount` from `account`: active stake first, then pending.
    /// @dev Capped at what the account has (a slasher racing a withdrawal should not fail);
    ///      reverts only when there is nothing at all. Returns the amount actually slashed.
    function slash(address account, uint256 amount, string calldata reason) external returns (uint256 slashed) {
        if (!hasRole(SLASHER_ROLE, msg.sender) && !hasRole(DEFAULT_ADMIN_ROLE, msg.sender)) {
            revert NotSlasher(msg.sender);
        }
        if (amount == 0) revert ZeroAmount();
        Position storage p = _positions[account];
        if (p.active + p.pending == 0) revert NothingToSlash(account);
        uint256 fromActive = amount < p.active ? amount : p.active;
        uint256 rest = amount - fromActive;
        uint256 fromPending = rest < p.pending ? rest : p.pending;
        p.active -= uint192(fromActive); // fromActive <= p.active
        p.pending -= uint192(fromPending); // fromPending <= p.pending
        totalPending -= fromPending;
        if (fromActive > 0) _transferVotingUnits(account, address(0), fromActive);
        slashed = fromActive + fromPending;
        emit Slashed(account, fromActive, fromPending, msg.sender, reason);
        token.safeTransfer(slashRecipient, slashed);
    }

    // ----- votes -----

    /// @notice Votes use timestamps (ERC-6372), so governance windows are in seconds.
    function clock() public view override returns (uint48) {
        return uint48(block.timestamp);
    }

    // solhint-disable-next-line func-name-mixedcase
    function CLOCK_MODE() public pure override returns (string memory) {
        return "mode=timestamp";
    }

    function _getVotingUnits(address account) internal view override returns (uint256) {
        return _positions[account].active;
    }

    /// @dev Every delegation (`delegate`, `delegateBySig`, a first stake's self-delegation)
    ///      passes here: one that changes the delegate records when (Staking's clock).
    function _delegate(address account, address delegatee) internal override {
        if (delegates(account) != delegatee) _positions[account].delegatedAt = uint64(clock());
        super._delegate(account, delegatee);
    }

    /// @notice Whom `account`'s votes go to and when that last changed (0: never). A dispute
    ///         fixes its jury from the votes one second before it opens, and bars the worker's
    ///         delegate; Disputes refuses one opened in the second of a delegation change
    ///         (`DelegationJustChanged`), when the votes of that second are not final yet.
    function delegationOf(address account) external view returns (address delegatee, uint64 changedAt) {
        return (delegates(account), _positions[account].delegatedAt);
    }

    /// @notice All active stake: the Votes total-supply checkpoint, which every change of
    ///         active stake already writes (no second counter to keep in step).
    function totalActive() external view returns (uint256) {
        return _getTotalSupply();
    }

    // ----- views -----

    /// @notice Stake that counts for tiers and selection (excludes the pending bucket).
    function activeStake(address account) external view returns (uint256) {
        return _positions[account].active;
    }

    function pendingStake(address account) external view returns (uint256 amount, uint64 unlockAt) {
        Position storage p = _positions[account];
        return (p.pending, p.unlockAt);
    }

    function meetsTier(address account, uint8 tier) external view returns (bool) {
        return _positions[account].active >= tierMinimum[tier];
    }
}

// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @title SOGNI token
/// @notice Fixed-supply ERC-20 with EIP-2612 permit, so stakers and claimers can approve with a
///         signature instead of a separate approval transaction.
/// @dev The whole supply is minted once to the treasury; there is no mint function afterwards.
///      Storage is laid out for the reward distributor's claims (docs/CONTRACTS.md, "Storage
///      layout (gas)"): an account's balance (low 128 bits) and the cumulative amount the
///      distributor has paid it (`claimedOf`, high 128 bits) share one slot, so a first claim
///      creates one storage slot instead of two (20k gas). OpenZeppelin's `_update`,
///      `balanceOf` and `totalSupply` are overridden to use that slot; everything else
///      (transfers, allowances, permit, events, errors) is OpenZeppelin's, unchanged. The
///      claimed half never affects a balance and only the bound distributor writes it
///      (`bookClaim`), only upwards. The distributor is bound after deployment by the
///      deployer, once (`setDistributor`); afterwards only the bound distributor may hand the
///      counters to a successor. An extension hooking `_update` (e.g. ERC20Votes) composes
///      as usual: it goes before this contract in the inheritance order and calls `super`.
contract SogniToken is ERC20, ERC20Permit {
    /// @notice 10 billion SOGNI with 18 decimals.
    uint256 public constant TOTAL_SUPPLY = 10_000_000_000 * 1e18;

    uint256 private constant _CLAIMED_SHIFT = 128;

    /// @dev account => balance (bits 0-127) | distributor-claimed cumulative amount (128-255).
    ///      Balances never carry into the claimed half: their sum is the supply, < 2^128.
    mapping(address account => uint256) private _words;
    uint256 private _supply;

    /// @notice The reward distributor that keeps its per-account claimed amounts here (zero
    ///         until the deployer binds it).
    address public distributor;
    /// @dev The account that deployed the token: it alone binds the first distributor.
    address private immutable _binder;

    event DistributorSet(address indexed previous, address indexed distributor);

    error ZeroAddress();
    /// @notice Only the bound distributor books claims or hands the book over (the deployer,
    ///         once, binds the first).
    error NotDistributor(address caller);
    /// @notice A cumulative amount at or above 2^128 cannot be booked (the supply is 10^28).
    error ClaimedOverflow(uint256 cumulativeAmount);

    constructor(address treasury) ERC20("Sogni", "SOGNI") ERC20Permit("Sogni") {
        if (treasury == address(0)) revert ZeroAddress();
        _binder = msg.sender;
        _mint(treasury, TOTAL_SUPPLY);
    }

    function totalSupply() public view override returns (uint256) {
        return _supply;
    }

    function balanceOf(address account) public view override returns (uint256) {
        return uint128(_words[account]);
    }

    /// @notice What the distributor has paid `account` so far (its cumulative claimed amount).
    function claimedOf(address account) external view returns (uint256) {
        return _words[account] >> _CLAIMED_SHIFT;
    }

    /// @notice Bind the distributor whose claimed amounts live here: the deployer, once, while
    ///         none is bound; afterwards only the bound distributor (its governance) can hand
    ///         the counters to a successor, which then continues the same cumulative tree.
    function setDistributor(address next) external {
        address current = distributor;
        if (msg.sender != (current == address(0) ? _binder : current)) revert NotDistributor(msg.sender);
        if (next == address(0)) revert ZeroAddress();
        distributor = next;
        emit DistributorSet(current, next);
    }

    /// @notice The distributor books a verified claim: `account`'s claimed amount becomes
    ///         `cumulativeAmount` and, with `pay`, the difference moves from the distributor to
    ///         `account` (a normal `Transfer`). Returns the amount claimed before; if
    ///         `cumulativeAmount` is not above it nothing changes (the distributor reverts).
    /// @dev The claimed half only grows, and only the bound distributor's own tokens move.
    function bookClaim(address account, uint256 cumulativeAmount, bool pay) external returns (uint256 already) {
        if (msg.sender != distributor) revert NotDistributor(msg.sender);
        already = _words[account] >> _CLAIMED_SHIFT;
        if (cumulativeAmount <= already) return already;
        if (cumulativeAmount > type(uint128).max) revert ClaimedOverflow(cumulativeAmount);
        unchecked {
            if (pay) _transfer(msg.sender, account, cumulativeAmount - already); // refuses account 0
        }
        // read again: paying changed the balance half (the slot is warm and dirty: ~200 gas)
        _words[account] = (cumulativeAmount << _CLAIMED_SHIFT) | uint128(_words[account]);
    }

    /// @dev OpenZeppelin's `_update` on the packed slots: same checks, errors and event.
    function _update(address from, address to, uint256 value) internal override {
        if (from == address(0)) {
            _supply = SafeCast.toUint128(_supply + value); // keeps every balance below 2^128
        } else {
            uint256 word = _words[from];
            uint256 fromBalance = uint128(word);
            if (fromBalance < value) revert ERC20InsufficientBalance(from, fromBalance, value);
            unchecked {
                _words[from] = word - value; // value <= the low half: no borrow from the claimed half
            }
        }
        unchecked {
            if (to == address(0)) {
                _supply -= value; // value <= a balance <= supply
            } else {
                _words[to] += value; // balance + value <= supply < 2^128: no carry
            }
        }
        emit Transfer(from, to, value);
    }
}

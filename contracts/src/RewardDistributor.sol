// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title Epoch reward distributor
/// @notice The coordinator posts, once per epoch, the root of an OpenZeppelin StandardMerkleTree
///         of (address account, uint256 cumulativeAmount): everything the account has earned
///         since the network began. A claim against the latest root pays the difference to what
///         the account already claimed, so a worker who skips epochs claims once, with one proof.
/// @dev Also the EIP-712 verifying contract for receipts and offers (name "SogniSupernet",
///      version "1"), so signatures are bound to this chain and this deployment.
///      A claim that would pay nothing reverts with `NothingToClaim` (rather than succeeding
///      silently) so wallets see the mistake at gas estimation and no gas is spent on a no-op.
///      Roles: DEFAULT_ADMIN_ROLE pauses/unpauses claims and manages roles; SETTLEMENT_ROLE
///      posts roots. Pausing blocks claims only: a bad root is fixed by posting the next epoch.
contract RewardDistributor is AccessControl, Pausable, EIP712 {
    using SafeERC20 for IERC20;

    bytes32 public constant SETTLEMENT_ROLE = keccak256("SETTLEMENT_ROLE");

    IERC20 public immutable token;
    /// @notice Merkle root posted for each epoch (zero if none).
    mapping(uint256 epoch => bytes32) public rootOf;
    /// @notice Content hash of each epoch's published receipts file, kept in state (not only in
    ///         the event) so it can be read back without log history.
    mapping(uint256 epoch => bytes32) public receiptsHashOf;
    uint256 public latestEpoch;
    uint256 public totalClaimed;
    mapping(address account => uint256) public claimed;

    event RootPosted(uint256 indexed epoch, bytes32 root, uint256 total, bytes32 receiptsHash);
    event Claimed(address indexed account, uint256 indexed epoch, uint256 amount, uint256 cumulativeAmount);

    error ZeroAddress();
    error ZeroRoot();
    error RootAlreadyPosted(uint256 epoch);
    error EpochNotIncreasing(uint256 epoch, uint256 latestEpoch);
    error Underfunded(uint256 owed, uint256 balance);
    error NoRoot();
    error InvalidProof();
    error NothingToClaim(address account, uint256 cumulativeAmount, uint256 alreadyClaimed);

    constructor(IERC20 token_, address admin, address settlement) EIP712("SogniSupernet", "1") {
        if (address(token_) == address(0) || admin == address(0)) revert ZeroAddress();
        token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        if (settlement != address(0)) _grantRole(SETTLEMENT_ROLE, settlement);
    }

    /// @notice Publish the payout root for `epoch`.
    /// @param total sum of all cumulative amounts in the tree; must be covered by this
    ///        contract's balance plus what was already claimed, so every leaf is payable.
    /// @param receiptsHash content address of the epoch's published receipts file.
    function postRoot(uint256 epoch, bytes32 root, uint256 total, bytes32 receiptsHash)
        external
        onlyRole(SETTLEMENT_ROLE)
    {
        if (root == bytes32(0)) revert ZeroRoot();
        if (rootOf[epoch] != bytes32(0)) revert RootAlreadyPosted(epoch);
        uint256 latest = latestEpoch;
        if (rootOf[latest] != bytes32(0) && epoch <= latest) revert EpochNotIncreasing(epoch, latest);
        uint256 balance = token.balanceOf(address(this));
        uint256 claimedSoFar = totalClaimed;
        uint256 owed = total > claimedSoFar ? total - claimedSoFar : 0;
        if (owed > balance) revert Underfunded(owed, balance);
        rootOf[epoch] = root;
        receiptsHashOf[epoch] = receiptsHash;
        latestEpoch = epoch;
        emit RootPosted(epoch, root, total, receiptsHash);
    }

    /// @notice Pay `account` its `cumulativeAmount` minus what it already claimed.
    /// @dev Anyone may submit (a relayer can pay gas); tokens always go to `account`.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        whenNotPaused
        returns (uint256 amount)
    {
        uint256 epoch = latestEpoch;
        bytes32 root = rootOf[epoch];
        if (root == bytes32(0)) revert NoRoot();
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) revert InvalidProof();
        uint256 already = claimed[account];
        if (cumulativeAmount <= already) revert NothingToClaim(account, cumulativeAmount, already);
        amount = cumulativeAmount - already;
        claimed[account] = cumulativeAmount;
        totalClaimed += amount;
        emit Claimed(account, epoch, amount, cumulativeAmount);
        token.safeTransfer(account, amount);
    }

    function pause() external onlyRole(DEFAULT_ADMIN_ROLE) {
        _pause();
    }

    function unpause() external onlyRole(DEFAULT_ADMIN_ROLE) {
        _unpause();
    }

    /// @notice The root claims are checked against (zero before the first post).
    function latestRoot() external view returns (bytes32) {
        return rootOf[latestEpoch];
    }

    /// @notice The EIP-712 domain separator receipts are signed under.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }
}

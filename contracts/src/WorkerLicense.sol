// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC721} from "@openzeppelin/contracts/token/ERC721/ERC721.sol";
import {AccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";

/// @title Fast-worker licence
/// @notice One ERC-721 token per licence. A fast worker must hold at least one valid licence
///         (not blacklisted). Governance can blacklist a licence (it stays with its holder but
///         stops counting and cannot be transferred) or burn it outright.
///         A licence that was transferred cannot be transferred again for `transferCooldown`
///         seconds (7 days at deployment), so one licence cannot be passed around between
///         many workers; minting starts no cooldown, burning ignores it.
/// @dev `validBalance` is maintained on every mint/transfer/burn/blacklist so `hasValidLicense`
///      is a single storage read, cheap enough for coordinators to poll per worker.
///      Roles: DEFAULT_ADMIN_ROLE is governance (blacklist, burn, cooldown, roles; one holder,
///      handed over in two steps after `defaultAdminDelay()`); MINTER_ROLE mints.
contract WorkerLicense is ERC721, AccessControlDefaultAdminRules {
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    uint256 public nextTokenId = 1;
    mapping(uint256 tokenId => bool) public blacklisted;
    mapping(address account => uint256) public validBalance;
    /// @notice Seconds a transferred licence must stay with its new holder.
    uint64 public transferCooldown;
    /// @notice When each licence last changed hands between two holders (0: never).
    mapping(uint256 tokenId => uint64) public lastTransferAt;

    event Blacklisted(uint256 indexed tokenId, bool blacklisted);
    event TransferCooldownSet(uint64 cooldown);

    error EmptyBatch();
    error LicenseBlacklisted(uint256 tokenId);
    error TransferCooldown(uint256 tokenId, uint64 until);

    /// @param adminTransferDelay seconds between `beginDefaultAdminTransfer` and its acceptance.
    constructor(address governance, uint48 adminTransferDelay)
        ERC721("Sogni Worker License", "SOGNI-WL")
        AccessControlDefaultAdminRules(adminTransferDelay, governance)
    {
        _grantRole(MINTER_ROLE, governance);
        transferCooldown = 7 days;
        emit TransferCooldownSet(7 days);
    }

    /// @notice Mint one licence to each address in `to`, with consecutive ids.
    /// @return firstId the id minted to `to[0]`; `to[i]` gets `firstId + i`.
    function mintBatch(address[] calldata to) external onlyRole(MINTER_ROLE) returns (uint256 firstId) {
        if (to.length == 0) revert EmptyBatch();
        firstId = nextTokenId;
        for (uint256 i = 0; i < to.length; ++i) {
            _mint(to[i], firstId + i);
        }
        nextTokenId = firstId + to.length;
    }

    /// @notice Stop `tokenId` from counting as a valid licence and freeze its transfers.
    function blacklist(uint256 tokenId) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setBlacklisted(tokenId, true);
    }

    /// @notice Undo a blacklisting (a wrongly accused worker gets the licence back).
    function unblacklist(uint256 tokenId) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _setBlacklisted(tokenId, false);
    }

    /// @notice Destroy `tokenId` regardless of its holder.
    function burn(uint256 tokenId) external onlyRole(DEFAULT_ADMIN_ROLE) {
        _burn(tokenId);
    }

    /// @notice Change the transfer cooldown (applies at once to licences already cooling down).
    function setTransferCooldown(uint64 cooldown) external onlyRole(DEFAULT_ADMIN_ROLE) {
        transferCooldown = cooldown;
        emit TransferCooldownSet(cooldown);
    }

    function hasValidLicense(address account) external view returns (bool) {
        return validBalance[account] > 0;
    }

    /// @notice When `tokenId` may next be transferred (0 or a past time: now).
    function transferableAt(uint256 tokenId) public view returns (uint64) {
        uint64 last = lastTransferAt[tokenId];
        if (last == 0) return 0;
        uint256 until = uint256(last) + transferCooldown;
        return until > type(uint64).max ? type(uint64).max : uint64(until);
    }

    function supportsInterface(bytes4 interfaceId)
        public
        view
        override(ERC721, AccessControlDefaultAdminRules)
        returns (bool)
    {
        return super.supportsInterface(interfaceId);
    }

    function _setBlacklisted(uint256 tokenId, bool value) private {
        address owner = _requireOwned(tokenId);
        if (blacklisted[tokenId] == value) return;
        blacklisted[tokenId] = value;
        if (value) {
            validBalance[owner] -= 1;
        } else {
            validBalance[owner] += 1;
        }
        emit Blacklisted(tokenId, value);
    }

    /// @dev Keeps `validBalance` in step; blacklisted tokens may only be burned; a transfer
    ///      between two holders needs the cooldown of the previous one over and starts a new one.
    function _update(address to, uint256 tokenId, address auth) internal override returns (address from) {
        bool isBlacklisted = blacklisted[tokenId];
        if (isBlacklisted && to != address(0)) revert LicenseBlacklisted(tokenId);
        from = super._update(to, tokenId, auth);
        if (to == address(0)) {
            delete lastTransferAt[tokenId];
        } else if (from != address(0)) {
            uint64 until = transferableAt(tokenId);
            if (block.timestamp < until) revert TransferCooldown(tokenId, until);
            lastTransferAt[tokenId] = uint64(block.timestamp);
        }
        if (isBlacklisted) {
            delete blacklisted[tokenId];
        } else {
            if (from != address(0)) validBalance[from] -= 1;
            if (to != address(0)) validBalance[to] += 1;
        }
    }
}
